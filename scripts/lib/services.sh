# Shared by scripts/test.sh and scripts/bench.sh: make sure the services the tests talk to are
# there. Postgres and Redis are expected on 127.0.0.1 (started if they are installed but down);
# moto (a real local S3) is installed if missing and started on a free port. A service that
# cannot be had is an error, never a skip: CI must not go green without it.

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

die() { echo "scripts: $*" >&2; exit 1; }

ensure_redis() {
  port_open 6379 && return 0
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 50); do port_open 6379 && return 0; sleep 0.1; done
  fi
  die "Redis is not reachable on 127.0.0.1:6379 (install redis-server or start it)"
}

ensure_redis_binary() {
  command -v redis-server >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 || true
  fi
  command -v redis-server >/dev/null || die "redis-server is needed (apt-get install redis-server)"
}

ensure_postgres() {
  port_open 5432 && return 0
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
    for _ in $(seq 100); do port_open 5432 && return 0; sleep 0.1; done
  fi
  die "Postgres is not reachable on 127.0.0.1:5432 (database 'test', trust auth)"
}

# bubblewrap: the sandbox every agent command runs in (the sandbox tests need it; a server
# without it refuses to run commands).
ensure_bwrap() {
  command -v bwrap >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || true
  fi
  command -v bwrap >/dev/null || die "bubblewrap is needed (apt-get install bubblewrap)"
}

MOTO_PID=""
ensure_moto() {
  if ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
    python3 -m pip install -q 'moto[server]' >/dev/null 2>&1 || die "cannot install moto[server] from PyPI"
  fi
  local port
  port=$(free_port)
  python3 -m moto.server -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/weldr-moto-$port.log" 2>&1 &
  MOTO_PID=$!
  for _ in $(seq 100); do
    port_open "$port" && break
    kill -0 "$MOTO_PID" 2>/dev/null || die "moto failed to start (see ${TMPDIR:-/tmp}/weldr-moto-$port.log)"
    sleep 0.1
  done
  port_open "$port" || die "moto did not open port $port"
  export WELDR_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
}

stop_moto() { [ -n "$MOTO_PID" ] && kill "$MOTO_PID" 2>/dev/null; wait "$MOTO_PID" 2>/dev/null || true; }

ensure_services() {
  ensure_bwrap
  ensure_redis_binary
  ensure_redis
  ensure_postgres
  ensure_moto
  trap stop_moto EXIT
  export WELDR_TEST_REDIS_URL="${WELDR_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
  export WELDR_TEST_DATABASE_URL="${WELDR_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
  echo "services: bubblewrap $(bwrap --version | cut -d' ' -f2), redis 127.0.0.1:6379, postgres 127.0.0.1:5432, moto S3 $WELDR_TEST_S3_ENDPOINT"
}
