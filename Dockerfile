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

FROM --platform=linux/amd64 debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates tini bubblewrap \
 && rm -rf /var/lib/apt/lists/*
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
