#!/usr/bin/env bash
# Runs the benchmarks and prints their Markdown tables (the README's figures come from here).
# Needs redis-server (installed from Debian's packages when missing and running as root) and
# git. Usage: scripts/bench.sh [event_log|fork ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh
ensure_redis_binary
command -v git >/dev/null || die "git is needed by the fork benchmark"
benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then
  mapfile -t benches < <(awk '/^\[\[bench\]\]/{b=1;next} b&&/^name/{gsub(/"/,"",$3); print $3; b=0}' Cargo.toml)
fi
for b in "${benches[@]}"; do
  cargo bench --locked --bench "$b"
done
