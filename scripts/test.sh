#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests against a real server on
# 127.0.0.1:0 and the real binary, with the services they need (Postgres, Redis, moto S3),
# then the integration templates built and started for real (scripts/verify-templates.sh).
# A missing service fails the run; nothing is skipped. CI calls this through .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

command -v cargo >/dev/null || die "cargo is needed (install Rust with rustup)"
command -v git >/dev/null || die "git is needed by the tests (they check repositories with git fsck)"
ensure_services
python3 scripts/layers.py

export RUST_BACKTRACE=1
cargo build --locked --workspace --bins --tests
cargo test --locked --workspace --no-fail-fast
# The integration templates install, typecheck, build and serve (node + pnpm + Postgres).
WELDR_AGENT_BIN=target/debug/weldr-agent bash scripts/verify-templates.sh
