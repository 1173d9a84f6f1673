#!/usr/bin/env bash
# Start a throwaway PostgreSQL on loopback for the ledger's PostgreSQL tests and print its URL.
# Usage: url=$(bash .ci/postgres.sh start)   ...   bash .ci/postgres.sh stop
set -euo pipefail
DIR=/tmp/autoglm-ci-postgres
PORT=55432

bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

case "${1:-start}" in
  start)
    if [ -z "$(bin_dir)" ]; then
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    fi
    bin=$(bin_dir)
    [ -f "$DIR/data/postmaster.pid" ] && runuser -u postgres -- "$bin/pg_ctl" -D "$DIR/data" -m fast stop >&2 || true
    rm -rf "$DIR" && mkdir -p "$DIR" && chown postgres "$DIR"
    runuser -u postgres -- "$bin/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
    runuser -u postgres -- "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w \
      -o "-k $DIR -c listen_addresses=127.0.0.1 -p $PORT" start >/dev/null
    runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$PORT" -U postgres autoglm_test
    echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/autoglm_test"
    ;;
  stop)
    bin=$(bin_dir)
    [ -n "$bin" ] && [ -f "$DIR/data/postmaster.pid" ] && runuser -u postgres -- "$bin/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null
    ;;
esac
