# Shared by scripts/test and scripts/kotlin-test (sourced, not run).
#
# start_server VAR=value…: starts the debug `privcomm serve` on a free
# loopback port in a new directory with the given environment (plus JSON
# logs and rate limits loose enough for tests) and sets SERVER_URL. The
# process id goes into the `servers` array and the directory into `dirs`, for
# the caller's cleanup; a server that does not start prints its log and exits.
servers=()
dirs=()

start_server() {
  local bin dir log address pid
  bin="$PWD/target/debug/privcomm"
  dir=$(mktemp -d)
  dirs+=("$dir")
  log="$dir/server.log"
  (cd "$dir" && exec env "$@" LOG_FORMAT=json RATE_LIMIT_KEY_BUNDLE=1000/1s RATE_LIMIT_REGISTRATION=1000/1s \
    "$bin" serve --listen 127.0.0.1:0 >"$log" 2>&1) &
  pid=$!
  servers+=("$pid")
  for _ in $(seq 1 120); do
    address=$(sed -n 's/.*"address":"\([^"]*\)".*"message":"privcomm serving".*/\1/p; s/.*"message":"privcomm serving".*"address":"\([^"]*\)".*/\1/p' "$log" | head -n 1)
    if [ -n "$address" ]; then
      SERVER_URL="http://$address"
      return
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  echo "error: the server did not start; its log:" >&2
  cat "$log" >&2
  exit 1
}

stop_servers() {
  for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "${dirs[@]}"
  servers=()
  dirs=()
}
