#!/usr/bin/env bash
# Prove the integration templates (integrations/) really work: render combinations with the
# binary (`weldr-agent integrations render`), then pnpm install, typecheck and build them, push
# the Drizzle schema to a fresh database, start the built API server and check /health (with
# its database check), a Better Auth sign-up and an oRPC call, and serve the built web app.
#
#   scripts/verify-templates.sh            # every scenario
#   WELDR_AGENT_BIN=path  DATABASE_HOST=127.0.0.1  DATABASE_PORT=5432  (defaults shown)
#
# Needs node 20.19+ (pnpm 10 is installed with npm when missing), psql and a Postgres that
# accepts `postgres` without a password (trust), and cargo unless WELDR_AGENT_BIN is given.
# Prints each step's time and ends with `TEMPLATES_OK scenarios=N seconds=T`.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
start_all=$(date +%s)
db_host="${DATABASE_HOST:-127.0.0.1}"
db_port="${DATABASE_PORT:-5432}"
store="${XDG_CACHE_HOME:-$HOME/.cache}/weldr-verify-pnpm"
work="$(mktemp -d -t weldr-templates.XXXXXX)"
pids=()
databases=()

cleanup() {
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for db in "${databases[@]:-}"; do
    [ -n "$db" ] && psql -h "$db_host" -p "$db_port" -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "TEMPLATES_FAILED: $*" >&2
  exit 1
}

step() {
  local name="$1"
  shift
  local t0
  t0=$(date +%s.%N)
  if ! "$@" >"$work/step.log" 2>&1; then
    tail -n 60 "$work/step.log" >&2
    fail "$name"
  fi
  printf '  %-44s %6.1f s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)"
}

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null) || fail "node is not installed"
[ "$node_major" -ge 20 ] || fail "node $node_major is too old (20.19+ needed)"
if ! command -v pnpm >/dev/null; then
  npm install -g pnpm@10 >/dev/null 2>&1 || fail "pnpm is missing and npm could not install it"
fi
command -v psql >/dev/null || fail "psql is not installed"

bin="${WELDR_AGENT_BIN:-}"
if [ -z "$bin" ]; then
  (cd "$root" && cargo build -q) || fail "cargo build"
  bin="$root/target/debug/weldr-agent"
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait until `url` answers with HTTP 200 (30 s); prints the body.
wait_200() {
  local url="$1" deadline=$((SECONDS + 30))
  while [ $SECONDS -lt $deadline ]; do
    if body=$(curl -fsS "$url" 2>/dev/null); then
      echo "$body"
      return 0
    fi
    sleep 0.3
  done
  return 1
}

scenarios=0
# name|integrations
for scenario in \
  "all|orpc tanstack-start postgresql better-auth" \
  "orpc|orpc" \
  "orpc+postgresql|orpc postgresql" \
  "orpc+tanstack-start|orpc tanstack-start"; do
  name="${scenario%%|*}"
  keys="${scenario#*|}"
  echo "scenario $name: $keys"
  dir="$work/$name"
  db="weldr_tpl_$$_${scenarios}"
  url="postgres://postgres@$db_host:$db_port/$db"
  # shellcheck disable=SC2086
  step "render" "$bin" integrations render "$dir" $keys --database-url "$url" --project "verify-$name"
  cd "$dir"
  step "pnpm install" pnpm install --prefer-offline --store-dir "$store" --reporter=append-only
  step "typecheck" pnpm -r typecheck
  step "build" pnpm -r build
  [ -f apps/server/dist/index.js ] || fail "$name: no apps/server/dist/index.js"
  if [[ " $keys " == *" postgresql "* ]]; then
    databases+=("$db")
    step "create database" psql -h "$db_host" -p "$db_port" -U postgres -d postgres -qc "CREATE DATABASE $db"
    step "db:push" pnpm --filter server db:push
  fi
  port=$(free_port)
  (cd apps/server && exec env PORT="$port" node dist/index.js >"$work/server-$name.log" 2>&1) &
  pids+=($!)
  server_pid=$!
  t0=$(date +%s.%N)
  health=$(wait_200 "http://127.0.0.1:$port/health") || { cat "$work/server-$name.log" >&2; fail "$name: /health"; }
  printf '  %-44s %6.1f s\n' "start + /health: $health" "$(echo "$(date +%s.%N) - $t0" | bc)"
  if [[ " $keys " == *" postgresql "* ]]; then
    [[ "$health" == *'"database":"ok"'* ]] || fail "$name: /health has no database check: $health"
  fi
  hello=$(curl -fsS -X POST "http://127.0.0.1:$port/rpc/hello" -H 'content-type: application/json' -d '{"json":{"name":"weldr"}}') || fail "$name: oRPC call"
  [[ "$hello" == *"Hello, weldr!"* ]] || fail "$name: oRPC answered $hello"
  if [[ " $keys " == *" better-auth "* ]]; then
    code=$(curl -sS -o "$work/signup.json" -w '%{http_code}' -X POST "http://127.0.0.1:$port/api/auth/sign-up/email" \
      -H 'content-type: application/json' -H 'origin: http://localhost:3000' \
      -d '{"email":"someone@example.com","password":"correct-horse-battery","name":"Someone"}')
    [ "$code" = 200 ] || { cat "$work/signup.json" >&2; fail "$name: sign-up answered $code"; }
    echo "  Better Auth sign-up: 200"
  fi
  kill "$server_pid" 2>/dev/null || true
  if [[ " $keys " == *" tanstack-start "* ]]; then
    [ -f apps/web/dist/server/server.js ] || fail "$name: no web build output"
    web_port=$(free_port)
    (cd apps/web && exec pnpm start --port "$web_port" --strictPort >"$work/web-$name.log" 2>&1) &
    pids+=($!)
    web_pid=$!
    page=$(wait_200 "http://127.0.0.1:$web_port/") || { cat "$work/web-$name.log" >&2; fail "$name: web app"; }
    [[ "$page" == *"<h1>Welcome</h1>"* ]] || fail "$name: the web app's page lacks its heading"
    echo "  web app served its page (SSR)"
    kill "$web_pid" 2>/dev/null || true
    pkill -f "vite preview --port $web_port" 2>/dev/null || true
  fi
  cd "$root"
  scenarios=$((scenarios + 1))
done

echo "TEMPLATES_OK scenarios=$scenarios seconds=$(($(date +%s) - start_all))"
