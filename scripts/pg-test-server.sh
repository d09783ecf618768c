#!/usr/bin/env bash
# A throwaway PostgreSQL server for the storage tests, on 127.0.0.1 only (needs Debian's `postgresql`).
#
#   scripts/pg-test-server.sh run CMD...   start, run CMD with TARFAS_TEST_DATABASE_URL set, always stop
#   scripts/pg-test-server.sh start DIR    start a server with its data in DIR (made if missing); print its URL
#   scripts/pg-test-server.sh stop DIR     stop it and delete DIR
#
# The server is for tests only: fsync off, role/password tarfas/tarfas, database tarfas, a free port.
set -euo pipefail

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [[ -z "$PG_BIN" || ! -x "$PG_BIN/initdb" ]]; then
  echo "pg-test-server: PostgreSQL server binaries not found (apt-get install postgresql, or set PG_BIN)" >&2
  exit 2
fi

# initdb and postgres refuse to run as root: run them as the postgres user then.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  local dir=$1 port
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [[ $(id -u) -eq 0 ]] && chown postgres: "$dir"
  as_owner "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  port=$(free_port)
  # Sockets in $dir, not /var/run/postgresql (not ours to use); fsync off: the data is thrown away anyway.
  # A server time zone far from UTC (+12:45/+13:45) shows any code that takes stored times for UTC.
  as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c TimeZone=Pacific/Chatham" >/dev/null \
    || { cat "$dir/server.log" >&2; exit 1; }
  as_owner "$PG_BIN/psql" -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres \
    -c "CREATE ROLE tarfas LOGIN PASSWORD 'tarfas'" -c "CREATE DATABASE tarfas OWNER tarfas" >/dev/null
  echo "postgresql+psycopg://tarfas:tarfas@127.0.0.1:$port/tarfas"
}

stop() {
  local dir=$1
  if [[ -f "$dir/data/postmaster.pid" ]]; then
    as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null || true
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) [[ $# -eq 2 ]] || { echo "usage: $0 start DIR" >&2; exit 2; }; start "$2" ;;
  stop) [[ $# -eq 2 ]] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$2" ;;
  run)
    shift
    [[ $# -ge 1 ]] || { echo "usage: $0 run CMD..." >&2; exit 2; }
    dir=$(mktemp -d "${TMPDIR:-/tmp}/tarfas-pg.XXXXXX")
    chmod 755 "$dir"
    trap 'stop "$dir"' EXIT
    trap 'exit 130' INT TERM
    TARFAS_TEST_DATABASE_URL=$(start "$dir")
    export TARFAS_TEST_DATABASE_URL
    echo "pg-test-server: $TARFAS_TEST_DATABASE_URL" >&2
    "$@"
    ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
