# Sourced by scripts/test: a private PostgreSQL cluster for the tests, as a local process.
#
#   postgres_start   installs PostgreSQL (Debian's package) if no initdb for 15+ is found, creates
#                    a cluster in a fresh temporary directory as the `postgres` user, starts it on
#                    127.0.0.1 on a free port, and exports HEADWATER_TEST_POSTGRES_URL.
#   postgres_stop    stops that cluster (by its data directory, never by process name) and
#                    removes the directory. Safe to call twice; scripts/test calls it on exit.
#
# An already exported HEADWATER_TEST_POSTGRES_URL is used as is: nothing is started.

HEADWATER_PG_DIR=""
HEADWATER_PG_BIN=""

postgres_find_bin() {
  local dir version
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] || continue
    version=$(basename "$(dirname "$dir")")
    if [ "${version%%.*}" -ge 15 ] 2>/dev/null; then
      HEADWATER_PG_BIN="$dir"
    fi
  done
  [ -n "$HEADWATER_PG_BIN" ]
}

postgres_free_port() {
  # Ask the kernel for a free port on loopback.
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

postgres_start() {
  if [ -n "${HEADWATER_TEST_POSTGRES_URL:-}" ]; then
    echo "using HEADWATER_TEST_POSTGRES_URL=$HEADWATER_TEST_POSTGRES_URL" >&2
    return 0
  fi
  if ! postgres_find_bin; then
    echo "installing PostgreSQL (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    postgres_find_bin || { echo "no initdb for PostgreSQL 15+ after installing" >&2; return 1; }
  fi
  HEADWATER_PG_DIR=$(mktemp -d /tmp/headwater-pg.XXXXXX)
  chmod 0755 "$HEADWATER_PG_DIR"
  mkdir "$HEADWATER_PG_DIR/data"
  chown postgres: "$HEADWATER_PG_DIR/data"
  local port
  port=$(postgres_free_port)
  local as_postgres=(runuser -u postgres --)
  [ "$(id -u)" = "$(id -u postgres)" ] && as_postgres=()
  "${as_postgres[@]}" "$HEADWATER_PG_BIN/initdb" -D "$HEADWATER_PG_DIR/data" --auth=trust \
    --username=postgres --encoding=UTF8 >"$HEADWATER_PG_DIR/initdb.log" 2>&1 \
    || { cat "$HEADWATER_PG_DIR/initdb.log" >&2; return 1; }
  "${as_postgres[@]}" "$HEADWATER_PG_BIN/pg_ctl" -D "$HEADWATER_PG_DIR/data" \
    -l "$HEADWATER_PG_DIR/data/server.log" \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $HEADWATER_PG_DIR/data -c max_connections=400 -c fsync=on -c synchronous_commit=on" \
    -w start >&2
  export HEADWATER_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "PostgreSQL $("$HEADWATER_PG_BIN/pg_ctl" --version | awk '{print $3}') on port $port ($HEADWATER_PG_DIR)" >&2
}

postgres_stop() {
  [ -n "$HEADWATER_PG_DIR" ] || return 0
  local as_postgres=(runuser -u postgres --)
  [ "$(id -u)" = "$(id -u postgres)" ] && as_postgres=()
  "${as_postgres[@]}" "$HEADWATER_PG_BIN/pg_ctl" -D "$HEADWATER_PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$HEADWATER_PG_DIR"
  HEADWATER_PG_DIR=""
}
