# Shared by bench/instructions.sh and bench/pg-instructions.sh (sourced, not run): the
# binaries, a sink, and one mailgate server taking a burst of emails into it. The caller
# defines `log` and `die`, sets ROOT, SKIP_BUILD, C, SIZE and MODE, and kills SINK_PID and
# SERVER_PID (when set) on exit.

# binaries: sets SERVER_BIN and LOADGEN_BIN (target/release unless set), built with cargo
# unless SKIP_BUILD=1.
binaries() {
  local target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
  SERVER_BIN=${SERVER_BIN:-$target_dir/release/mailgate}
  LOADGEN_BIN=${LOADGEN_BIN:-$target_dir/release/examples/loadgen}
  if [ "$SKIP_BUILD" != 1 ]; then
    log "building: cargo build --release --bin mailgate --example loadgen"
    cargo build --release --bin mailgate --example loadgen >&2
  fi
  [ -x "$SERVER_BIN" ] || die "mailgate binary not found: $SERVER_BIN"
  [ -x "$LOADGEN_BIN" ] || die "loadgen binary not found: $LOADGEN_BIN"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_sink: Postfix's smtp-sink on a free loopback port; sets SINK_PORT and SINK_PID.
start_sink() {
  local user_opt=()
  if [ "$(id -u)" = 0 ]; then
    if id postfix >/dev/null 2>&1; then user_opt=(-u postfix); else user_opt=(-u nobody); fi
  fi
  SINK_PORT=$(free_port)
  smtp-sink -m 256 "${user_opt[@]}" "127.0.0.1:$SINK_PORT" 1024 >/dev/null 2>&1 &
  SINK_PID=$!
}

# burst BIN URL N RUN [WRAPPER...]: runs `BIN serve` on the database URL (its data folder and
# logs in the folder RUN, started through WRAPPER when given, e.g. valgrind), waits until it
# answers its health check, sends N emails into the sink with the load generator (which waits
# until all are SENT) and stops the server gracefully.
burst() {
  local bin=$1 url=$2 n=$3 run=$4 port ready=0
  shift 4
  mkdir -p "$run/data"
  port=$(free_port)
  MAILGATE_LISTEN_ADDR="127.0.0.1:$port" MAILGATE_DATA_DIR="$run/data" MAILGATE_DATABASE_URL="$url" \
  MAILGATE_SMTP__ALLOWED_NETWORKS='["127.0.0.0/8"]' MAILGATE_SMTP__ALLOWED_PORTS="[$SINK_PORT]" \
  MAILGATE_DELIVERY__CONCURRENCY="$C" MAILGATE_SHUTDOWN_GRACE=30s MAILGATE_LOG__FORMAT=json \
  MAILGATE_ENCRYPTION__KEY="$(python3 -c 'import os, base64; print(base64.b64encode(os.urandom(32)).decode())')" \
  MAILGATE_ENCRYPTION__KEY_ID=bench \
    "$@" "$bin" serve >"$run/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    if "$bin" healthcheck --addr "127.0.0.1:$port" --timeout 2s >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.2
  done
  [ "$ready" = 1 ] || { tail -20 "$run/server.log" >&2; die "mailgate did not start"; }
  if [ -n "${BURST_BEFORE:-}" ]; then "$BURST_BEFORE" "$url"; fi
  "$LOADGEN_BIN" --addr "127.0.0.1:$port" --tenant bench --smtp-host 127.0.0.1 \
    --smtp-port "$SINK_PORT" --messages "$n" --concurrency "$C" --size "$SIZE" --mode "$MODE" \
    --json "$run/loadgen.json" >"$run/loadgen.out" 2>&1 \
    || { tail -5 "$run/loadgen.out" >&2; die "loadgen failed"; }
  kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
