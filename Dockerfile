# syntax=docker/dockerfile:1
# Build: docker build --platform linux/amd64 -t registry.fly.io/weldr-images:weldr-agent .
FROM --platform=linux/amd64 rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY storage storage
COPY src src
COPY web web
COPY integrations integrations
COPY migrations migrations
COPY benches benches
RUN cargo build --release --locked --bin weldr-agent

# Node LTS and pnpm for the apps the agent builds (integrations: pnpm install, typecheck, build).
FROM --platform=linux/amd64 node:22-bookworm-slim AS node

FROM --platform=linux/amd64 debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates tini bubblewrap \
 && rm -rf /var/lib/apt/lists/*
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules /usr/local/lib/node_modules
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
 && npm install -g pnpm@10.34.9 \
 && node --version && pnpm --version
COPY --from=build /src/target/release/weldr-agent /usr/local/bin/weldr-agent
COPY scripts/*.sh /usr/local/bin/
ENV WELDR_MODE=cloud \
    PORT=8080 \
    HOST=0.0.0.0 \
    WORKSPACE_BASE=/workspace \
    SHUTDOWN_TIMEOUT_SECONDS=20 \
    LOG_LEVEL=info
VOLUME /workspace
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["weldr-agent", "serve"]
