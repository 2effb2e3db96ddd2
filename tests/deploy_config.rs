//! Dockerfile, fly.toml and the configuration defaults agree (the original's Fly config once
//! listened on 80 while the server used 8080, and mounted no volume at /workspace).

use std::collections::HashMap;

use weldr_agent::config::Config;

fn read(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

#[test]
fn fly_and_docker_match_the_cloud_defaults() {
    let fly = read("fly.toml");
    let docker = read("Dockerfile");
    let cloud = Config::from_map(&HashMap::from([
        ("WELDR_MODE".to_string(), "cloud".to_string()),
        ("PROJECT_ID".to_string(), "p".to_string()),
    ]))
    .unwrap();
    assert_eq!(cloud.port, 8080);
    assert_eq!(cloud.workspace_base, std::path::PathBuf::from("/workspace"));

    assert!(has_line(&fly, "internal_port = 8080"));
    assert!(has_line(&fly, "destination = \"/workspace\""));
    assert!(has_line(&fly, "path = \"/health\""));
    assert!(has_line(&fly, "kill_signal = \"SIGTERM\""));
    let kill_timeout: u64 = fly
        .lines()
        .find_map(|l| l.trim().strip_prefix("kill_timeout = "))
        .and_then(|v| v.parse().ok())
        .expect("kill_timeout");
    assert!(
        cloud.shutdown_timeout.as_secs() < kill_timeout,
        "shutdown fits in Fly's kill timeout"
    );
    assert!(has_line(&fly, "SHUTDOWN_TIMEOUT_SECONDS = \"20\""));

    assert!(has_line(&docker, "EXPOSE 8080"));
    assert!(docker.contains("WORKSPACE_BASE=/workspace"));
    assert!(docker.contains("git ca-certificates"));
    assert!(docker.contains("bubblewrap"), "the agent's command sandbox");
    assert!(docker.contains("COPY scripts/*.sh /usr/local/bin/"));
    assert!(docker.contains("--platform=linux/amd64"));
    assert!(has_line(&docker, "STOPSIGNAL SIGTERM"));
    // The apps the agent builds need Node LTS and pnpm 10 at run time.
    assert!(docker.contains("FROM --platform=linux/amd64 node:22-bookworm-slim AS node"));
    assert!(docker.contains("COPY --from=node /usr/local/bin/node /usr/local/bin/node"));
    assert!(docker.contains("npm install -g pnpm@10"));
    // What the build embeds (rust-embed, refinery's migrations) must be in the build stage.
    for dir in ["web", "integrations", "migrations"] {
        assert!(
            has_line(&docker, &format!("COPY {dir} {dir}")),
            "the image's build stage lacks {dir}/"
        );
    }
}
