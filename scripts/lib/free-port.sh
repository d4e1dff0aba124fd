# Sourced by scripts/lib/*.sh: free TCP ports on loopback.
#
#   free_ports N   prints N distinct ports that were free on 127.0.0.1 a moment ago, one a line
#                  (all N sockets are held at once, so the N ports differ).

free_ports() {
  python3 - "$1" <<'PY' 2>/dev/null && return 0
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
for s in held:
    print(s.getsockname()[1])
PY
  # Without python3: random ports in a range the kernel does not hand out by default.
  local i base=$((20000 + RANDOM % 20000))
  for ((i = 0; i < $1; i++)); do echo $((base + i)); done
}

# wait_for_tcp PORT SECONDS PID: true once 127.0.0.1:PORT accepts a connection; false when
# SECONDS pass first or the process PID (the server being waited for) has exited.
wait_for_tcp() {
  local port=$1 deadline=$((SECONDS + $2)) pid=$3
  while ((SECONDS < deadline)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
