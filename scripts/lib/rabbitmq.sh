# Sourced by scripts/test: a private RabbitMQ node for the tests, as a local process.
#
#   rabbitmq_launch   installs rabbitmq-server (Debian's package) if missing and starts a node
#                     with a unique name, its own epmd, AMQP and distribution ports on 127.0.0.1
#                     (free ports), and every file (mnesia, logs, config, cookie) in a fresh
#                     temporary directory. Returns at once: the node takes a few seconds to boot.
#   rabbitmq_wait     waits (bounded) until it accepts AMQP connections and exports
#                     HEADWATER_TEST_AMQP_URL.
#   rabbitmq_start    rabbitmq_launch, then rabbitmq_wait.
#   rabbitmq_stop     stops that node (rabbitmqctl -n NODE stop) and its epmd (epmd -port PORT
#                     -kill), never by process name, and removes the directory. Safe to call
#                     twice; scripts/test calls it on exit.
#
# An already exported HEADWATER_TEST_AMQP_URL is used as is: nothing is started.

# shellcheck source=free-port.sh
. "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"

HEADWATER_RABBITMQ_DIR=""
HEADWATER_RABBITMQ_PID=""
HEADWATER_RABBITMQ_NODE=""
HEADWATER_RABBITMQ_PORT=""
HEADWATER_RABBITMQ_EPMD_PORT=""
HEADWATER_RABBITMQ_BIN=/usr/lib/rabbitmq/bin
HEADWATER_RABBITMQ_START_SECS_MAX=60
HEADWATER_RABBITMQ_STOP_SECS_MAX=30

# The environment every rabbitmq command of this node runs with (server, rabbitmqctl, epmd).
rabbitmq_env() {
  env HOME="$HEADWATER_RABBITMQ_DIR" \
    RABBITMQ_NODENAME="$HEADWATER_RABBITMQ_NODE" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$HEADWATER_RABBITMQ_PORT" \
    RABBITMQ_DIST_PORT="$HEADWATER_RABBITMQ_DIST_PORT" \
    ERL_EPMD_PORT="$HEADWATER_RABBITMQ_EPMD_PORT" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_MNESIA_BASE="$HEADWATER_RABBITMQ_DIR/mnesia" \
    RABBITMQ_LOG_BASE="$HEADWATER_RABBITMQ_DIR/log" \
    RABBITMQ_CONFIG_FILE="$HEADWATER_RABBITMQ_DIR/rabbitmq.conf" \
    RABBITMQ_CONF_ENV_FILE="$HEADWATER_RABBITMQ_DIR/rabbitmq-env.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$HEADWATER_RABBITMQ_DIR/enabled_plugins" \
    "$@"
}

rabbitmq_launch() {
  [ -z "${HEADWATER_TEST_AMQP_URL:-}" ] || return 0
  [ -z "$HEADWATER_RABBITMQ_PID" ] || return 0
  if [ ! -x "$HEADWATER_RABBITMQ_BIN/rabbitmq-server" ]; then
    echo "installing rabbitmq-server (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >&2
  fi
  HEADWATER_RABBITMQ_DIR=$(mktemp -d /tmp/headwater-rabbitmq.XXXXXX)
  HEADWATER_RABBITMQ_NODE="hw-$(basename "$HEADWATER_RABBITMQ_DIR" | cut -d. -f2)@localhost"
  local ports
  ports=$(free_ports 3 | tr '\n' ' ')
  read -r HEADWATER_RABBITMQ_PORT HEADWATER_RABBITMQ_DIST_PORT HEADWATER_RABBITMQ_EPMD_PORT <<<"$ports"
  mkdir -p "$HEADWATER_RABBITMQ_DIR/mnesia" "$HEADWATER_RABBITMQ_DIR/log"
  printf 'loopback_users = none\n' >"$HEADWATER_RABBITMQ_DIR/rabbitmq.conf"
  : >"$HEADWATER_RABBITMQ_DIR/rabbitmq-env.conf"
  printf '[].\n' >"$HEADWATER_RABBITMQ_DIR/enabled_plugins"
  rabbitmq_env "$HEADWATER_RABBITMQ_BIN/rabbitmq-server" >"$HEADWATER_RABBITMQ_DIR/server.log" 2>&1 &
  HEADWATER_RABBITMQ_PID=$!
}

rabbitmq_wait() {
  if [ -n "${HEADWATER_TEST_AMQP_URL:-}" ] && [ -z "$HEADWATER_RABBITMQ_PID" ]; then
    echo "using HEADWATER_TEST_AMQP_URL=$HEADWATER_TEST_AMQP_URL" >&2
    return 0
  fi
  [ -n "$HEADWATER_RABBITMQ_PID" ] || { echo "rabbitmq_wait: no node launched" >&2; return 1; }
  if ! wait_for_tcp "$HEADWATER_RABBITMQ_PORT" "$HEADWATER_RABBITMQ_START_SECS_MAX" "$HEADWATER_RABBITMQ_PID"; then
    echo "RabbitMQ did not answer on port $HEADWATER_RABBITMQ_PORT within ${HEADWATER_RABBITMQ_START_SECS_MAX}s:" >&2
    cat "$HEADWATER_RABBITMQ_DIR/server.log" >&2
    return 1
  fi
  export HEADWATER_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$HEADWATER_RABBITMQ_PORT/%2f"
  echo "RabbitMQ node $HEADWATER_RABBITMQ_NODE on port $HEADWATER_RABBITMQ_PORT ($HEADWATER_RABBITMQ_DIR)" >&2
}

rabbitmq_start() {
  rabbitmq_launch && rabbitmq_wait
}

rabbitmq_stop() {
  [ -n "$HEADWATER_RABBITMQ_PID" ] || return 0
  rabbitmq_env timeout "$HEADWATER_RABBITMQ_STOP_SECS_MAX" \
    "$HEADWATER_RABBITMQ_BIN/rabbitmqctl" -n "$HEADWATER_RABBITMQ_NODE" stop >/dev/null 2>&1 || true
  # The node's own epmd (started by the Erlang VM on ERL_EPMD_PORT) outlives the node.
  rabbitmq_env epmd -port "$HEADWATER_RABBITMQ_EPMD_PORT" -kill >/dev/null 2>&1 || true
  # The server script we started exits once the node has; if `stop` failed, end it by its pid.
  local deadline=$((SECONDS + HEADWATER_RABBITMQ_STOP_SECS_MAX))
  while kill -0 "$HEADWATER_RABBITMQ_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  kill -TERM "$HEADWATER_RABBITMQ_PID" 2>/dev/null || true
  wait "$HEADWATER_RABBITMQ_PID" 2>/dev/null || true
  rm -rf "$HEADWATER_RABBITMQ_DIR"
  HEADWATER_RABBITMQ_PID=""
  HEADWATER_RABBITMQ_DIR=""
}
