# shellcheck shell=bash
# Sourced by the scripts that run the real embedder on a loopback port (benches, client
# tests): start_embedder BINARY LOG [FLAGS...] starts it on a free port, stops it on exit, and
# returns once it is ready (or prints its log and fails). Sets EMBEDDER_PORT and EMBEDDER_PID.
# Several may run at once: every one started is stopped on exit.
start_embedder() {
  local binary="$1" log="$2"
  shift 2
  EMBEDDER_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$binary" --listen "127.0.0.1:$EMBEDDER_PORT" "$@" >"$log" 2>&1 &
  EMBEDDER_PID=$!
  EMBEDDER_PIDS="${EMBEDDER_PIDS:-} $EMBEDDER_PID"
  # shellcheck disable=SC2064 # the pids are fixed now, on purpose
  trap "kill $EMBEDDER_PIDS 2>/dev/null; wait $EMBEDDER_PIDS 2>/dev/null || true" EXIT
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$EMBEDDER_PORT/health/ready" >/dev/null && return 0
    kill -0 "$EMBEDDER_PID" 2>/dev/null || { cat "$log" >&2; echo "the embedder exited" >&2; return 1; }
    sleep 0.1
  done
  echo "the embedder was not ready within 60 s; its log: $log" >&2
  return 1
}
