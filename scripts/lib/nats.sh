# Sourced by scripts/test: a private NATS server with JetStream for the tests, as a local process.
#
#   nats_launch   installs nats-server (Debian's package) if missing, starts it on 127.0.0.1 on a
#                 free port with JetStream storing in a fresh temporary directory. Returns at once.
#   nats_wait     waits (bounded) until it answers and exports HEADWATER_TEST_NATS_URL.
#   nats_start    nats_launch, then nats_wait.
#   nats_stop     stops that server (by its pid, never by process name) and removes the
#                 directory. Safe to call twice; scripts/test calls it on exit.
#
# An already exported HEADWATER_TEST_NATS_URL is used as is: nothing is started.
#
# Debian's nats-server (2.9) does not fsync each JetStream message: its acks mean "in the
# server's memory and the page cache", which is enough for tests (see docs/design/publishing.md).

# shellcheck source=free-port.sh
. "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"

HEADWATER_NATS_DIR=""
HEADWATER_NATS_PID=""
HEADWATER_NATS_PORT=""
HEADWATER_NATS_START_SECS_MAX=20

nats_launch() {
  [ -z "${HEADWATER_TEST_NATS_URL:-}" ] || return 0
  [ -z "$HEADWATER_NATS_PID" ] || return 0
  if ! command -v nats-server >/dev/null 2>&1; then
    echo "installing nats-server (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >&2
  fi
  HEADWATER_NATS_DIR=$(mktemp -d /tmp/headwater-nats.XXXXXX)
  HEADWATER_NATS_PORT=$(free_ports 1)
  nats-server -js -a 127.0.0.1 -p "$HEADWATER_NATS_PORT" -sd "$HEADWATER_NATS_DIR/jetstream" \
    >"$HEADWATER_NATS_DIR/server.log" 2>&1 &
  HEADWATER_NATS_PID=$!
}

nats_wait() {
  if [ -n "${HEADWATER_TEST_NATS_URL:-}" ] && [ -z "$HEADWATER_NATS_PID" ]; then
    echo "using HEADWATER_TEST_NATS_URL=$HEADWATER_TEST_NATS_URL" >&2
    return 0
  fi
  [ -n "$HEADWATER_NATS_PID" ] || { echo "nats_wait: no server launched" >&2; return 1; }
  if ! wait_for_tcp "$HEADWATER_NATS_PORT" "$HEADWATER_NATS_START_SECS_MAX" "$HEADWATER_NATS_PID"; then
    echo "NATS did not answer on port $HEADWATER_NATS_PORT within ${HEADWATER_NATS_START_SECS_MAX}s:" >&2
    cat "$HEADWATER_NATS_DIR/server.log" >&2
    return 1
  fi
  export HEADWATER_TEST_NATS_URL="nats://127.0.0.1:$HEADWATER_NATS_PORT"
  echo "NATS $(nats-server --version | awk '{print $2}') with JetStream on port $HEADWATER_NATS_PORT ($HEADWATER_NATS_DIR)" >&2
}

nats_start() {
  nats_launch && nats_wait
}

nats_stop() {
  [ -n "$HEADWATER_NATS_PID" ] || return 0
  kill -TERM "$HEADWATER_NATS_PID" 2>/dev/null || true
  wait "$HEADWATER_NATS_PID" 2>/dev/null || true
  rm -rf "$HEADWATER_NATS_DIR"
  HEADWATER_NATS_PID=""
  HEADWATER_NATS_DIR=""
}
