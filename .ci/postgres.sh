#!/usr/bin/env bash
# Best effort: start a throwaway local PostgreSQL for the multi-worker Optuna test and print its URL.
# Prints nothing (and the test is skipped) where PostgreSQL cannot be installed or started.
set -uo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 || exit 0
    else
        exit 0
    fi
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
DIR=${KVCOMP_PG_DIR:-$(mktemp -d /tmp/kvcomp-pg.XXXXXX)}  # .ci/run passes its own, to stop this server by pid
# a free port unless one is given (a fixed one may be held by another server: then this test would be skipped)
PORT=${KVCOMP_PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' || echo 55432)}
RUN=()
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; RUN=(su postgres -s /bin/bash -c); else RUN=(bash -c); fi
"${RUN[@]}" "$PGBIN/initdb -D $DIR/data -A trust -U postgres" >/dev/null 2>&1 || exit 0
"${RUN[@]}" "$PGBIN/pg_ctl -D $DIR/data -l $DIR/log -w -o '-k $DIR -p $PORT -c listen_addresses=127.0.0.1' start" \
    >/dev/null 2>&1 || exit 0
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/postgres"
