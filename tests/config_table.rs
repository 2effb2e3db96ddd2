//! The README's configuration table and the settings table in `src/config.rs` agree: the same
//! variables, each with the same default. The README is the user's reference; the code's
//! table is what the server reads and `weldr-agent config` prints.

use std::collections::BTreeMap;

use weldr_agent::config::SETTINGS;

/// A README cell as plain text: no code marks, an en dash for "none" read as `-`.
fn plain(cell: &str) -> String {
    let text = cell.trim().replace('`', "");
    if text == "–" { "-".into() } else { text }
}

/// (variable, default) of every row of the README's "## Configuration" table. A row may name
/// several variables (`A` / `B`); its default then names one per variable (`x` / `y`), or one
/// for all.
fn readme_settings() -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let start = readme
        .find("\n## Configuration\n")
        .expect("README has a ## Configuration section");
    let section = &readme[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut out = Vec::new();
    let rows = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.trim().trim_matches('|').split(" | ").collect::<Vec<_>>());
    for cells in rows {
        assert!(
            cells.len() >= 3,
            "a README row without three cells: {cells:?}"
        );
        let vars: Vec<String> = cells[0].split(" / ").map(plain).collect();
        let defaults: Vec<String> = cells[1].split(" / ").map(plain).collect();
        for (i, var) in vars.iter().enumerate() {
            let default = match defaults.len() == vars.len() {
                true => defaults[i].clone(),
                false => plain(cells[1]),
            };
            out.push((var.clone(), default));
        }
    }
    out
}

#[test]
fn the_readme_table_matches_the_settings_table() {
    let mut readme: BTreeMap<String, String> = BTreeMap::new();
    for (var, default) in readme_settings() {
        assert!(
            readme.insert(var.clone(), default).is_none(),
            "the README lists {var} twice"
        );
    }
    let code: BTreeMap<String, String> = SETTINGS
        .iter()
        .map(|s| (s.var().to_string(), s.unset().text()))
        .collect();
    assert!(
        code.len() > 40 && readme.len() > 40,
        "both tables were read"
    );

    let mut problems = Vec::new();
    for (var, default) in &code {
        match readme.get(var) {
            None => problems.push(format!("{var} is a setting but not in the README's table")),
            Some(d) if d != default => problems.push(format!(
                "{var}: the README says the default is {d:?}, the code {default:?}"
            )),
            Some(_) => {}
        }
    }
    for var in readme.keys().filter(|v| !code.contains_key(*v)) {
        problems.push(format!("{var} is in the README's table but is no setting"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The comparison itself catches what it should (a README edited by hand drifts silently).
#[test]
fn a_readme_row_is_read_per_variable() {
    assert_eq!(plain(" `sessions` "), "sessions");
    assert_eq!(plain("–"), "-");
    let readme = readme_settings();
    let get = |var: &str| {
        readme
            .iter()
            .find(|(v, _)| v == var)
            .map(|(_, d)| d.as_str())
    };
    assert_eq!(get("AUTH_USERS_TABLE"), Some("users"));
    assert_eq!(get("S3_SECRET_ACCESS_KEY"), Some("-"));
    assert_eq!(get("HOST"), Some("127.0.0.1 local, 0.0.0.0 cloud"));
    assert_eq!(get("NO_SUCH_SETTING"), None);
}
