#!/usr/bin/env bash
# mailgate delivery benchmark: one command, from the repository root or anywhere:
#
#   bash bench/run.sh                      # references + every mailgate pass
#   bash bench/run.sh --references-only    # only the two SMTP client references (no cargo)
#
# Settings (environment variables; defaults in brackets):
#   N [20000]            messages per pass
#   C [32]               concurrency: smtp-source sessions, Nodemailer pool connections,
#                        loadgen callers and mailgate's delivery.concurrency
#   SIZE [1500]          approximate size of each message on the wire, headers included, bytes
#   PASSES ["sqlite postgres"]  databases to run the mailgate passes on
#   RATE [1000]          requests/s of the fixed-rate latency pass
#   RATE_N [=N]          messages in the fixed-rate pass
#   RATE_ON [postgres]   databases (among PASSES) that also get the fixed-rate pass
#   PG_URL [postgres://postgres@127.0.0.1:5432]  server for the postgres passes (no database
#                        name: a fresh database is created per pass and dropped afterwards)
#   OUT [bench/results/<UTC timestamp>.json]     the JSON result file
#   REFERENCES_ONLY [0]  1: same as --references-only
#   REF_RUNS [1]         runs of each reference before the mailgate passes
#   REPEAT [1]           runs of each SendEmail and SendBatch pass (in rounds: every pass
#                        once, then again); the targets use each pass's median run, and the
#                        table lists every run (the median one marked *)
#   REF_CLOSE [1]        1: each reference runs once more after the passes; the ratios use
#                        the median of all its runs, and the table says how far each
#                        reference moved while the passes ran (the machine's speed drifts)
#   NODEMAILER_VERSION [10.6.1]  (versions before 10 lack TCP_NODELAY: ~4x slower, unfit)
#   NODEMAILER_MAX_MESSAGES [inf]  messages per pooled connection (Nodemailer's default: 100)
#   SINK_COUNT [0]       1: smtp-sink -c, an exact count of received messages per run
#                        (costs the sink one write per message: ~10% off the smtp-source rate)
#   SKIP_INSTALL [0]     1: never call apt-get / npm install (fail if something is missing)
#   SKIP_BUILD [0]       1: do not run cargo; use SERVER_BIN / LOADGEN_BIN or target/release
#   SERVER_BIN, LOADGEN_BIN   prebuilt binaries (default: $CARGO_TARGET_DIR or target/release)
#   BENCH_LOG_LEVEL [info]      mailgate's log level during the passes
#   PASS_TIMEOUT [900]   seconds one loadgen run may take before it is killed
#   STARTUP_TIMEOUT [60] seconds mailgate may take to answer its health check
#   KEEP_TMP [0]         1: keep the work directory (logs, per-pass JSON) after the run
#   SYNC_DELAY_US [0]    >0: a slower disk for the mailgate server: every fsync/fdatasync it
#                        makes (SQLite's) takes this many microseconds longer
#                        (bench/slow_sync.c, built with cc and loaded with LD_PRELOAD; a
#                        PostgreSQL server's syncs are not slowed)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

REFERENCES_ONLY=${REFERENCES_ONLY:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --references-only) REFERENCES_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A relative OUT given by the caller is relative to the caller's directory.
if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT="$PWD/$OUT"; fi
cd "$ROOT"

N=${N:-20000}
C=${C:-32}
SIZE=${SIZE:-1500}
PASSES=${PASSES:-sqlite postgres}
RATE=${RATE:-1000}
RATE_N=${RATE_N:-$N}
RATE_ON=${RATE_ON:-postgres}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
PG_URL=${PG_URL%/}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-bench/results/$STAMP.json}
REF_RUNS=${REF_RUNS:-1}
REPEAT=${REPEAT:-1}
REF_CLOSE=${REF_CLOSE:-1}
NODEMAILER_MAX_MESSAGES=${NODEMAILER_MAX_MESSAGES:-inf}
NODEMAILER_VERSION=${NODEMAILER_VERSION:-10.6.1}
SINK_COUNT=${SINK_COUNT:-0}
SKIP_INSTALL=${SKIP_INSTALL:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
BENCH_LOG_LEVEL=${BENCH_LOG_LEVEL:-info}
PASS_TIMEOUT=${PASS_TIMEOUT:-900}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-60}
KEEP_TMP=${KEEP_TMP:-0}
SYNC_DELAY_US=${SYNC_DELAY_US:-0}

# smtp-sink and smtp-source live in /usr/sbin, which a non-root PATH often lacks.
export PATH="$PATH:/usr/sbin:/sbin"

# Messages go to the script's stderr even from inside a redirected function (fd 9 keeps it).
exec 9>&2
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&9; }
die() { printf '[bench] ERROR: %s\n' "$*" >&9; exit 1; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }
for v in N C SIZE RATE RATE_N REF_RUNS REPEAT PASS_TIMEOUT STARTUP_TIMEOUT; do
  is_uint "${!v}" || die "$v must be a positive integer (got '${!v}')"
done
case "$REF_CLOSE" in 0|1) ;; *) die "REF_CLOSE must be 0 or 1 (got '$REF_CLOSE')" ;; esac
[[ "$SYNC_DELAY_US" =~ ^[0-9]{1,9}$ ]] || die "SYNC_DELAY_US must be a whole number of microseconds, at most 9 digits (got '$SYNC_DELAY_US')"
for db in $PASSES; do
  case "$db" in sqlite|postgres) ;; *) die "PASSES may contain only 'sqlite' and 'postgres' (got '$db')" ;; esac
done
[ -r /proc/self/status ] || die "this harness needs Linux /proc"

# ---------------------------------------------------------------------------------------------
# Work directory and cleanup: every process this script starts and every database it creates
# is recorded here and removed on exit, however the script ends.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailgate-bench.XXXXXX")
chmod 755 "$WORK"
SINK_PID=""
SERVER_PID=""
PG_DBS=()

# TERM, up to 10 s of grace, then KILL; only ever a process id this script started.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [ "$rc" = 0 ] || log "stopped with status $rc"
  stop_pid "$CHILD_PID"
  stop_pid "$SERVER_PID"
  stop_pid "$SINK_PID"
  for db in "${PG_DBS[@]}"; do
    psql "$PG_URL/postgres" -qAt -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
      || log "could not drop database $db (drop it by hand)"
  done
  wait 2>/dev/null
  if [ "$KEEP_TMP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Helpers
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

apt_install() {
  [ "$SKIP_INSTALL" = 1 ] && die "missing $* and SKIP_INSTALL=1: install it first (apt-get install $*)"
  command -v apt-get >/dev/null || die "missing $* and no apt-get: install it by hand"
  log "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
    || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends "$@" >"$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log" >&2; die "apt-get install $* failed"; }
}

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{process.stdout.write(String(s.address().port));s.close()})'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat).
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
cpu_seconds() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  awk -v t="$CLK_TCK" '{ printf "%.3f", ($12 + $13) / t }' <<<"$stat"
}

# utime + stime of every PostgreSQL server process on this machine (named "postgres"), in
# seconds: the database's work in a postgres pass. It counts the server's other databases too,
# and misses a backend that exits during the pass; "null" when there is none (a server on
# another machine). A process that exits between the glob and the read makes cat fail, which
# must not end the run (pipefail and set -e did, without a word, in a run of 2026-12-07).
db_cpu_seconds() {
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v t="$CLK_TCK" \
    '$2 == "(postgres)" { s += $14 + $15; n++ } END { if (n) printf "%.3f", s / t; else printf "null" }'
}

peak_rss_mib() {
  local status
  status=$(cat "/proc/$1/status" 2>/dev/null) || { echo null; return; }
  awk '/^VmHWM:/ { printf "%.1f", $2 / 1024; found = 1 } END { if (!found) printf "null" }' <<<"$status"
}

# Messages the sink has accepted so far (its -c counter line "sess=.. quit=.. mesg=N");
# 0 when SINK_COUNT is off.
sink_count() {
  local line
  [ "$SINK_COUNT" = 1 ] || { echo 0; return; }
  line=$(tail -c 512 "$WORK/sink.counter" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 || true)
  line=${line#mesg=}
  echo "${line:-0}"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# settle [DB]: before each run, write out what earlier work left in the page cache (the build's
# output, the last pass's database files) and, before a PostgreSQL pass, the server's own dirty
# buffers (CHECKPOINT). Left to the kernel's writeback, that data reaches the disk during the
# next run and each of its syncs waits behind it: SendEmail's p99 at 1,000/s went from 3.6 ms
# to 54 ms with 4 GB written just before the run and no sync (measured). Logs what took time.
settle() {
  local t0 t1 dirty
  dirty=$(awk '/^Dirty:/ { print int($2 / 1024) }' /proc/meminfo)
  t0=$(date +%s%N)
  sync
  if [ "${1:-}" = postgres ]; then
    psql "$PG_URL/postgres" -qAt -c CHECKPOINT >/dev/null 2>&1 \
      || log "note: CHECKPOINT failed on $PG_URL (the pass runs without it)"
  fi
  t1=$(date +%s%N)
  if [ $(( (t1 - t0) / 1000000 )) -ge 200 ]; then
    log "settle: ${dirty} MiB of dirty pages written out before the run ($(( (t1 - t0) / 1000000 )) ms)"
  fi
}

# The machine's CPU ticks so far, all and stolen (/proc/stat): on a VM the host can take
# CPU time away (steal), which slows a run without showing in any process's CPU time.
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9 }' /proc/stat; }
# The stolen share of the CPU time between two cpu_ticks readings.
steal_share() {
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[1] - x[1];
    printf "%.3f", (d > 0 ? (y[2] - x[2]) / d : 0) }'
}

# Runs a command in the background and waits for it (so a TERM or INT to this script is handled
# at once, not after the command ends); writes "wall user sys" seconds of the command to file $1.
# The CPU figures come from the shell's `times` (CPU of waited-for children), read without a
# subshell, before and after.
CHILD_PID=""
children_cpu() {
  times >"$WORK/times.tmp"
  tail -1 "$WORK/times.tmp" | awk '{ for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t[i] = a[1] * 60 + a[2] } printf "%.3f %.3f", t[1], t[2] }'
}
timed() {
  local tf=$1 t0 t1 c0u c0s c1u c1s rc=0; shift
  children_cpu >"$tf.c0"; t0=$(date +%s.%N)
  "$@" &
  CHILD_PID=$!
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  t1=$(date +%s.%N); children_cpu >"$tf.c1"
  read -r c0u c0s <"$tf.c0"; read -r c1u c1s <"$tf.c1"; rm -f "$tf.c0" "$tf.c1"
  awk -v a="$t0" -v b="$t1" -v u0="$c0u" -v u1="$c1u" -v s0="$c0s" -v s1="$c1s" \
    'BEGIN { printf "%.3f %.3f %.3f\n", b - a, u1 - u0, s1 - s0 }' >"$tf"
  return $rc
}

# ---------------------------------------------------------------------------------------------
# Step 1: tools
log "work directory $WORK; N=$N C=$C SIZE=$SIZE PASSES='$PASSES' references_only=$REFERENCES_ONLY"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt_install nodejs npm
fi
NODE_MAJOR=$(node -p 'process.versions.node.split(".")[0]')
if [ "$NODE_MAJOR" -lt 20 ]; then
  # Nodemailer 10 declares Node >= 20. Older Nodemailer releases do not set TCP_NODELAY and
  # crawl at ~600 msg/s (Nagle + delayed ACK), which would make a meaningless reference.
  log "WARNING: Node $(node --version) is older than 20, which nodemailer@$NODEMAILER_VERSION declares; trying anyway (install Node.js >= 20 for a trustworthy reference)"
fi

if ! command -v smtp-sink >/dev/null || ! command -v smtp-source >/dev/null; then
  # "No configuration": Debian's postfix then writes no main.cf, so no system MTA is started
  # on port 25 (policy-rc.d in containers also blocks it). smtp-sink/smtp-source need neither.
  if [ "$SKIP_INSTALL" != 1 ] && command -v debconf-set-selections >/dev/null; then
    printf '%s\n' 'postfix postfix/main_mailer_type select No configuration' \
      'postfix postfix/mailname string localhost' | as_root debconf-set-selections
  fi
  apt_install postfix
  command -v smtp-sink >/dev/null || die "postfix installed but smtp-sink not found"
  if port_open 25; then
    log "note: something listens on 127.0.0.1:25; the benchmark does not use port 25"
  fi
fi
SMTP_SINK=$(command -v smtp-sink)
SMTP_SOURCE=$(command -v smtp-source)

NPM_DIR="$WORK/npm"
[ "$SKIP_INSTALL" = 1 ] && [ -z "${NODEMAILER_DIR:-}" ] \
  && die "SKIP_INSTALL=1 needs NODEMAILER_DIR (a folder with node_modules/nodemailer)"
if [ -n "${NODEMAILER_DIR:-}" ]; then
  NPM_DIR=$NODEMAILER_DIR
else
  log "installing nodemailer@$NODEMAILER_VERSION into a temporary folder"
  npm install --prefix "$NPM_DIR" --no-audit --no-fund --no-save --loglevel=error \
    "nodemailer@$NODEMAILER_VERSION" >"$WORK/npm.log" 2>&1 \
    || { tail -20 "$WORK/npm.log" >&2; die "npm install nodemailer@$NODEMAILER_VERSION failed"; }
fi
[ -f "$NPM_DIR/node_modules/nodemailer/package.json" ] || die "nodemailer not found in $NPM_DIR/node_modules"

if [ "$REFERENCES_ONLY" != 1 ]; then
  # mailgate reads every MAILGATE_* variable as configuration (and rejects unknown keys).
  inherited=$(env | grep -o '^MAILGATE_[A-Za-z0-9_]*' | tr '\n' ' ' || true)
  [ -z "$inherited" ] || log "note: these MAILGATE_* variables from your environment reach the server: $inherited"
  case " $PASSES " in
    *" postgres "*)
      command -v psql >/dev/null || apt_install postgresql-client
      psql "$PG_URL/postgres" -qAt -c 'select 1' >/dev/null 2>"$WORK/psql.err" \
        || { cat "$WORK/psql.err" >&2; die "PostgreSQL is not reachable at $PG_URL (start it, set PG_URL, or run with PASSES=sqlite)"; }
      ;;
  esac
  TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  SERVER_BIN=${SERVER_BIN:-$TARGET_DIR/release/mailgate}
  LOADGEN_BIN=${LOADGEN_BIN:-$TARGET_DIR/release/examples/loadgen}
  if [ "$SKIP_BUILD" != 1 ]; then
    command -v cargo >/dev/null || die "cargo not found (install Rust, or SKIP_BUILD=1 with SERVER_BIN/LOADGEN_BIN)"
    log "building: cargo build --release --bin mailgate --example loadgen"
    cargo build --release --bin mailgate --example loadgen &
    CHILD_PID=$!
    wait "$CHILD_PID" || die "cargo build failed"
    CHILD_PID=""
  fi
  [ -x "$SERVER_BIN" ] || die "mailgate binary not found: $SERVER_BIN"
  [ -x "$LOADGEN_BIN" ] || die "loadgen binary not found: $LOADGEN_BIN (examples/loadgen.rs)"
fi

# ---------------------------------------------------------------------------------------------
# Step 2: the sink. One smtp-sink for the whole run. With SINK_COUNT=1, -c keeps a running
# message counter (one short line per message, to a file) so every run can check what really
# arrived; it costs the sink a write per message, so it is off by default.
start_sink() {
  local user_opt=() port try
  if [ "$(id -u)" = 0 ]; then
    if id postfix >/dev/null 2>&1; then user_opt=(-u postfix); else user_opt=(-u nobody); fi
  fi
  local max_conn=$(( C * 4 + 64 )); [ "$max_conn" -lt 256 ] && max_conn=256
  for try in 1 2 3; do
    port=$(free_port)
    local count_opt=(); [ "$SINK_COUNT" = 1 ] && count_opt=(-c)
    "$SMTP_SINK" "${count_opt[@]}" -m "$max_conn" "${user_opt[@]}" "127.0.0.1:$port" 1024 \
      >"$WORK/sink.counter" 2>"$WORK/sink.err" &
    SINK_PID=$!
    for _ in $(seq 50); do
      kill -0 "$SINK_PID" 2>/dev/null || break
      if port_open "$port"; then SINK_PORT=$port; return 0; fi
      sleep 0.1
    done
    kill "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true
    SINK_PID=""
    log "smtp-sink did not start on port $port (try $try): $(tail -3 "$WORK/sink.err")"
  done
  die "could not start smtp-sink"
}
start_sink
log "smtp-sink listening on 127.0.0.1:$SINK_PORT (pid $SINK_PID)"

sink_alive() { [ -n "$SINK_PID" ] && kill -0 "$SINK_PID" 2>/dev/null; }
# Before each run: if the sink has gone (something else on the machine killed it), start a new
# one; every run reads SINK_PORT afresh, so the runs after it use the new sink.
ensure_sink() {
  sink_alive && return 0
  log "WARNING: smtp-sink (pid $SINK_PID) has exited: $(tail -3 "$WORK/sink.err" 2>/dev/null); starting a new one"
  wait "$SINK_PID" 2>/dev/null || true
  start_sink
  log "smtp-sink listening on 127.0.0.1:$SINK_PORT (pid $SINK_PID)"
}

# Waits (briefly) until the sink has counted at least $1 messages; prints the count.
sink_wait_for() {
  local want=$1 got
  [ "$SINK_COUNT" = 1 ] || { echo 0; return; }
  for _ in $(seq 50); do
    got=$(sink_count); [ "$got" -ge "$want" ] && break; sleep 0.1
  done
  sink_count
}

mkdir -p "$WORK/refs" "$WORK/passes"
LOADAVG_START=$(loadavg)
log "load average at start: $LOADAVG_START (other work on this machine lowers every figure)"

# ---------------------------------------------------------------------------------------------
# Step 3: reference 1, smtp-source. -d keeps each session's connection for its next message
# (like a pool), -F sends a pre-built message of about SIZE bytes on the wire.
node -e '
  const size = +process.argv[1];
  const head = ["From: Bench Sender <bench@example.test>", "To: rcpt@example.test",
    "Subject: mailgate benchmark message", "Date: " + new Date().toUTCString(),
    "Message-ID: <bench.1@example.test>", "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 7bit", "", ""].join("\n");
  let wire = head.length + head.split("\n").length - 1;   // LF goes out as CRLF
  let body = "";
  while (wire + 77 <= size) { body += "x".repeat(75) + "\n"; wire += 77; }
  if (size - wire > 2) { body += "y".repeat(size - wire - 2) + "\n"; wire = size; }
  require("fs").writeFileSync(process.argv[2], head + body);
  process.stdout.write(String(wire));
' "$SIZE" "$WORK/message.txt" >"$WORK/message.bytes"
SOURCE_BYTES=$(cat "$WORK/message.bytes")

run_smtp_source() {
  local k=$1 before after sc0 sc1 rc=0
  ensure_sink
  settle
  before=$(sink_count); sc0=$(cpu_seconds "$SINK_PID"); local ticks0; ticks0=$(cpu_ticks)
  log "reference smtp-source run $k: $N messages, $C sessions"
  timed "$WORK/refs/smtp-source-$k.time" \
    "$SMTP_SOURCE" -d -s "$C" -m "$N" -F "$WORK/message.txt" \
      -f bench@example.test -t rcpt@example.test "127.0.0.1:$SINK_PORT" \
      >"$WORK/refs/smtp-source-$k.out" 2>&1 || rc=$?
  after=$(sink_wait_for $(( before + N ))); sc1=$(cpu_seconds "$SINK_PID")
  sink_alive || { log "smtp-sink died during the run"; return 75; }
  [ "$rc" = 0 ] || { tail -5 "$WORK/refs/smtp-source-$k.out" >&2; ref_failed "smtp-source failed (exit $rc)"; return 1; }
  read -r wall user sys <"$WORK/refs/smtp-source-$k.time"
  local received=$(( after - before ))
  [ "$SINK_COUNT" != 1 ] || [ "$received" -eq "$N" ] || log "WARNING: the sink counted $received messages, expected $N"
  [ "$SINK_COUNT" = 1 ] || received=null
  cat >"$WORK/refs/smtp-source-$k.json" <<EOF
{"tool": "smtp-source", "messages": $N, "sessions": $C, "message_bytes": $SOURCE_BYTES,
 "seconds": $wall, "rate": $(awk -v n="$N" -v s="$wall" 'BEGIN { printf "%.1f", n / s }'),
 "cpu_user_seconds": $user, "cpu_system_seconds": $sys,
 "sink_received": $received, "sink_cpu_seconds": $(awk -v a="$sc0" -v b="$sc1" 'BEGIN { printf "%.3f", b - a }'),
 "steal_share": $(steal_share "$ticks0" "$(cpu_ticks)"), "loadavg_before": "$(loadavg)"}
EOF
  log "smtp-source: $(awk -v n="$N" -v s="$wall" 'BEGIN { printf "%.0f msg/s (%.2f s)", n / s, s }')"
}

# Step 4: reference 2, Nodemailer pool.
run_nodemailer() {
  local k=$1 before after sc0 sc1 rc=0
  ensure_sink
  settle
  before=$(sink_count); sc0=$(cpu_seconds "$SINK_PID"); local ticks0; ticks0=$(cpu_ticks)
  log "reference nodemailer@$NODEMAILER_VERSION run $k: $N messages, pool of $C connections"
  timed "$WORK/refs/nodemailer-$k.time" \
    env NODE_PATH="$NPM_DIR/node_modules" node "$ROOT/bench/nodemailer_ref.js" --host 127.0.0.1 --port "$SINK_PORT" \
      --messages "$N" --connections "$C" --size "$SIZE" --max-messages "$NODEMAILER_MAX_MESSAGES" \
      --json "$WORK/refs/nodemailer-$k.json" >"$WORK/refs/nodemailer-$k.out" 2>&1 || rc=$?
  after=$(sink_wait_for $(( before + N ))); sc1=$(cpu_seconds "$SINK_PID")
  sink_alive || { log "smtp-sink died during the run"; return 75; }
  [ "$rc" = 0 ] || { tail -20 "$WORK/refs/nodemailer-$k.out" >&2; ref_failed "the Nodemailer reference failed (exit $rc)"; return 1; }
  cat >"$WORK/refs/nodemailer-$k.extra.json" <<EOF
{"sink_received": $([ "$SINK_COUNT" = 1 ] && echo $(( after - before )) || echo null), "sink_cpu_seconds": $(awk -v a="$sc0" -v b="$sc1" 'BEGIN { printf "%.3f", b - a }'),
 "steal_share": $(steal_share "$ticks0" "$(cpu_ticks)"), "loadavg_before": "$(loadavg)"}
EOF
  [ "$SINK_COUNT" != 1 ] || [ $(( after - before )) -eq "$N" ] || log "WARNING: the sink counted $(( after - before )) messages, expected $N"
  log "nodemailer: $(node -p 'const r=require(process.argv[1]); `${Math.round(r.rate)} msg/s (${r.seconds} s)`' "$WORK/refs/nodemailer-$k.json")"
}

# A reference run that failed ends the benchmark, except the closing runs (CLOSING=1): the
# passes are done by then, and the report goes without them.
CLOSING=0
ref_failed() {
  if [ "$CLOSING" = 1 ]; then log "WARNING: $*"; else die "$*"; fi
}

# Run `k` of both references. A run during which the sink died is run again once, on a new
# sink.
run_references() {
  local k=$1 ref rc
  for ref in run_smtp_source run_nodemailer; do
    rc=0; "$ref" "$k" || rc=$?
    if [ "$rc" = 75 ]; then rc=0; "$ref" "$k" || rc=$?; fi
    if [ "$rc" != 0 ]; then
      [ "$rc" = 75 ] && ref_failed "$ref failed twice because smtp-sink died"
      return 1
    fi
  done
}
for k in $(seq "$REF_RUNS"); do
  run_references "$k"
done

# ---------------------------------------------------------------------------------------------
# Steps 5 and 6: mailgate passes. Each pass gets a fresh server and a fresh database, so peak
# RSS and CPU belong to that pass alone.
FAILED_PASSES=0

# SYNC_DELAY_US: the server starts through `env LD_PRELOAD=slow_sync.so` (bench/slow_sync.c).
SLOW_SYNC=()
if [ "$SYNC_DELAY_US" -gt 0 ] && [ "$REFERENCES_ONLY" != 1 ]; then
  command -v cc >/dev/null 2>&1 || die "SYNC_DELAY_US needs a C compiler (cc) to build bench/slow_sync.c"
  cc -shared -fPIC -O2 -o "$WORK/slow_sync.so" "$ROOT/bench/slow_sync.c" -ldl \
    || die "building bench/slow_sync.c failed"
  SLOW_SYNC=(env LD_PRELOAD="$WORK/slow_sync.so" SYNC_DELAY_US="$SYNC_DELAY_US")
  log "every fsync and fdatasync of the mailgate server takes ${SYNC_DELAY_US} us longer (SYNC_DELAY_US)"
else
  SYNC_DELAY_US=0  # no server runs: the report says none was slowed
fi

stop_server() {
  stop_pid "$SERVER_PID"
  SERVER_PID=""
}

drop_db() {
  local db=$1 rest=()
  psql "$PG_URL/postgres" -qAt -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null \
    || { log "could not drop database $db"; return 0; }
  for d in "${PG_DBS[@]}"; do [ "$d" = "$db" ] || rest+=("$d"); done
  PG_DBS=("${rest[@]}")
}

# run_pass DB MODE RUN [RATE]: RUN is the pass's run number (1..REPEAT)
run_pass() {
  local db=$1 mode=$2 run=$3 rate=${4:-} name dir port url dbname="" messages=$N
  name="$db-$mode${rate:+-rate$rate}"
  [ "$REPEAT" -gt 1 ] && [ -z "$rate" ] && name="$name-run$run"
  [ -n "$rate" ] && messages=$RATE_N
  dir="$WORK/passes/$name"; mkdir -p "$dir/data"
  ensure_sink
  port=$(free_port)
  if [ "$db" = sqlite ]; then
    url="sqlite://$dir/data/mailgate.db"
  else
    dbname="mailgate_bench_$$_${mode}${rate:+_rate$rate}_$run"
    PG_DBS+=("$dbname")
    psql "$PG_URL/postgres" -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$dbname\"" >/dev/null \
      || die "could not create database $dbname on $PG_URL"
    url="$PG_URL/$dbname"
  fi
  settle "$db"

  # A throw-away encryption key, as in production (no development-key warning, no key file).
  local ENC_KEY; ENC_KEY=$(node -p 'require("crypto").randomBytes(32).toString("base64")')
  log "pass $name: starting mailgate on 127.0.0.1:$port ($db)"
  local t_start; t_start=$(date +%s.%N)
  MAILGATE_LISTEN_ADDR="127.0.0.1:$port" \
  MAILGATE_DATA_DIR="$dir/data" \
  MAILGATE_DATABASE_URL="$url" \
  MAILGATE_SMTP__ALLOWED_NETWORKS='["127.0.0.0/8"]' \
  MAILGATE_SMTP__ALLOWED_PORTS="[$SINK_PORT]" \
  MAILGATE_DELIVERY__CONCURRENCY="$C" \
  MAILGATE_SHUTDOWN_GRACE=5s \
  MAILGATE_LOG__LEVEL="$BENCH_LOG_LEVEL" \
  MAILGATE_LOG__FORMAT=json \
  MAILGATE_ENCRYPTION__KEY="$ENC_KEY" \
  MAILGATE_ENCRYPTION__KEY_ID=bench \
    ${SLOW_SYNC[@]+"${SLOW_SYNC[@]}"} "$SERVER_BIN" serve >"$dir/server.log" 2>&1 &
  SERVER_PID=$!

  local ready=0 deadline=$(( $(date +%s) + STARTUP_TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    if "$SERVER_BIN" healthcheck --addr "127.0.0.1:$port" --timeout 1s >/dev/null 2>&1; then
      ready=1; break
    fi
    sleep 0.2
  done
  if [ "$ready" != 1 ]; then
    tail -20 "$dir/server.log" >&2
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      die "mailgate did not become healthy within ${STARTUP_TIMEOUT}s (pass $name; log above)"
    fi
    local st=0; wait "$SERVER_PID" || st=$?; SERVER_PID=""
    die "mailgate exited with status $st before becoming healthy (pass $name; log above)"
  fi
  local startup; startup=$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
  local cpu0 sink0 sc0 la
  cpu0=$(cpu_seconds "$SERVER_PID"); sink0=$(sink_count); sc0=$(cpu_seconds "$SINK_PID"); la=$(loadavg)
  local ticks0; ticks0=$(cpu_ticks)
  local db0=null db1=null
  [ "$db" = postgres ] && db0=$(db_cpu_seconds)

  local args=(--addr "127.0.0.1:$port" --tenant bench --smtp-host 127.0.0.1 --smtp-port "$SINK_PORT"
              --messages "$messages" --concurrency "$C" --size "$SIZE" --mode "$mode"
              --json "$dir/loadgen.json")
  [ -n "$rate" ] && args+=(--rate "$rate")
  log "pass $name: loadgen ${args[*]}"
  local rc=0
  timed "$dir/loadgen.time" timeout --kill-after=10 "$PASS_TIMEOUT" "$LOADGEN_BIN" "${args[@]}" \
    >"$dir/loadgen.out" 2>&1 || rc=$?

  # Sample the server before stopping it: peak RSS (VmHWM) and CPU time (utime + stime).
  local cpu1 rss sink1 sc1 steal alive=true sink_ok=true
  steal=$(steal_share "$ticks0" "$(cpu_ticks)")
  kill -0 "$SERVER_PID" 2>/dev/null || alive=false
  sink_alive || sink_ok=false
  cpu1=$(cpu_seconds "$SERVER_PID"); rss=$(peak_rss_mib "$SERVER_PID")
  [ "$db" = postgres ] && db1=$(db_cpu_seconds)
  sink1=$(sink_wait_for $(( sink0 + messages ))); sc1=$(cpu_seconds "$SINK_PID")
  stop_server
  [ -n "$dbname" ] && drop_db "$dbname"

  local wall=null lg_user=null lg_sys=null
  [ -s "$dir/loadgen.time" ] && read -r wall lg_user lg_sys <"$dir/loadgen.time"
  local loadgen_json=null
  if [ -s "$dir/loadgen.json" ] && node -e 'JSON.parse(require("fs").readFileSync(process.argv[1]))' "$dir/loadgen.json" 2>/dev/null; then
    loadgen_json=$(cat "$dir/loadgen.json")
  fi
  if [ "$rc" != 0 ] || [ "$loadgen_json" = null ] || [ "$alive" = false ] || [ "$sink_ok" = false ]; then
    FAILED_PASSES=$(( FAILED_PASSES + 1 ))
    local why="loadgen exit $rc"
    [ "$rc" = 124 ] && why="loadgen timed out after ${PASS_TIMEOUT}s"
    [ "$loadgen_json" = null ] && why="$why, no valid JSON in $dir/loadgen.json"
    [ "$alive" = false ] && why="$why, mailgate died during the pass"
    [ "$sink_ok" = false ] && why="$why, smtp-sink died during the pass"
    log "pass $name FAILED ($why)"
    tail -10 "$dir/loadgen.out" >&2 || true
    tail -10 "$dir/server.log" >&2 || true
  fi
  cat >"$dir/meta.json" <<EOF
{"name": "$name", "database": "$db", "mode": "$mode", "rate": ${rate:-null}, "run": $run, "messages": $messages,
 "concurrency": $C, "size": $SIZE, "loadgen_exit": $rc, "server_alive_at_end": $alive,
 "sink_alive_at_end": $sink_ok, "sink_port": $SINK_PORT,
 "loadgen_wall_seconds": $wall, "loadgen_cpu_seconds": $(awk -v u="${lg_user/null/0}" -v s="${lg_sys/null/0}" 'BEGIN { printf "%.3f", u + s }'),
 "server": {"startup_seconds": $startup, "peak_rss_mib": $rss, "cpu_seconds": $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.3f", b - a }'),
            "cpu_seconds_total": $cpu1},
 "database_cpu_seconds": $(awk -v a="$db0" -v b="$db1" 'BEGIN { if (a == "null" || b == "null") printf "null"; else printf "%.3f", b - a }'),
 "sink_received": $([ "$SINK_COUNT" = 1 ] && echo $(( sink1 - sink0 )) || echo null), "sink_cpu_seconds": $(awk -v a="$sc0" -v b="$sc1" 'BEGIN { printf "%.3f", b - a }'),
 "steal_share": $steal, "loadavg_before": "$la",
 "loadgen": $loadgen_json}
EOF
  if [ "$loadgen_json" != null ]; then
    log "pass $name: $(node -p 'const r=require(process.argv[1]); `delivered ${Math.round(r.delivered_rate)} msg/s, accepted ${Math.round(r.accept_rate)}/s, p99 ${r.latency_ms && Number(r.latency_ms.p99).toFixed(2)} ms, errors ${r.errors}` + (r.slow_windows && r.slow_windows.length ? `; requests over 10 ms by 100 ms window of their planned start: ${r.slow_windows.map(w => `${w.at_s} s: ${w.requests} (max ${Math.round(w.max_ms)} ms)`).join(", ")}` : "")' "$dir/loadgen.json"); peak RSS ${rss} MiB"
  fi
}

if [ "$REFERENCES_ONLY" != 1 ]; then
  # In rounds, so that a change of the machine's speed during the run reaches every pass alike.
  for run in $(seq "$REPEAT"); do
    for db in $PASSES; do
      run_pass "$db" unary "$run"
      run_pass "$db" batch "$run"
      if [ "$run" = 1 ]; then
        case " $RATE_ON " in *" $db "*) run_pass "$db" unary 1 "$RATE" ;; esac
      fi
    done
  done
  # The references once more: the ratios then rest on the references' speed on both sides of
  # the passes, and a run whose machine changed speed meanwhile says so.
  if [ "$REF_CLOSE" = 1 ]; then
    CLOSING=1
    if ! run_references close; then
      log "WARNING: the closing reference runs failed; the report uses the opening runs alone"
      rm -f "$WORK"/refs/*-close.json "$WORK"/refs/*-close.extra.json
    fi
    CLOSING=0
  fi
fi

# ---------------------------------------------------------------------------------------------
# Step 7: one table, one JSON file.
mkdir -p "$(dirname "$OUT")"
BENCH_N="$N" BENCH_C="$C" BENCH_SIZE="$SIZE" BENCH_PASSES="$PASSES" BENCH_RATE="$RATE" \
BENCH_RATE_N="$RATE_N" BENCH_RATE_ON="$RATE_ON" BENCH_REFERENCES_ONLY="$REFERENCES_ONLY" BENCH_REPEAT="$REPEAT" \
BENCH_NPROC="$(nproc)" BENCH_LOADAVG_START="$LOADAVG_START" BENCH_LOADAVG_END="$(loadavg)" \
BENCH_NODEMAILER_DIR="$NPM_DIR" BENCH_MAILGATE_BIN="${SERVER_BIN:-}" \
BENCH_POSTFIX_VERSION="$(postconf -d -h mail_version 2>/dev/null || echo unknown)" \
BENCH_PG_URL="$PG_URL" BENCH_LOG_LEVEL="$BENCH_LOG_LEVEL" BENCH_SINK_COUNT="$SINK_COUNT" \
BENCH_SYNC_DELAY_US="$SYNC_DELAY_US" \
  node "$ROOT/bench/report.js" "$WORK" "$OUT"
log "results written to $OUT"

if [ "$FAILED_PASSES" -gt 0 ]; then
  die "$FAILED_PASSES mailgate pass(es) failed (see above)"
fi
