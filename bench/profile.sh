#!/usr/bin/env bash
# Where mailgate's CPU time goes during a burst: a sampling profile of the server (perf, the
# kernel's own profiler, with the software clock, which works on VMs without hardware
# counters), folded into a flame graph and a table by component.
#
#   bash bench/profile.sh                          # SQLite, SendEmail
#   DB=postgres MODE=batch bash bench/profile.sh   # PostgreSQL, SendBatch
#
# It runs one mailgate server under `perf record` on a fresh database, sends N emails into
# Postfix's smtp-sink with the load generator (C callers) and stops the server. Unlike
# bench/instructions.sh (callgrind: instructions, one thread at a time, no kernel), this
# counts time, every thread at once and the kernel's work on mailgate's behalf (system calls,
# the file system, TCP, waking threads), at the machine's real speed; like any timing, its
# shares move a little from run to run.
#
# Output, in OUT_DIR:
#   summary.txt   the share of samples by thread, by component (the innermost known
#                 component on the sample's stack: SQLite, gRPC/HTTP/2, SMTP, tracing,
#                 the allocator, the tokio runtime, mailgate's own code) split into user and
#                 kernel time, and the 30 functions most samples landed in
#   summary.json  the same figures
#   folded.txt    the stacks, one line each with its sample count (thread name first)
#   flamegraph.svg  the flame graph of folded.txt (inferno; open it in a browser)
#   database.txt  DB=postgres with a local server: the PostgreSQL server's processes through
#                 the same burst (the whole machine sampled, processes named postgres kept),
#                 without call stacks: their share of user and kernel time and the 40
#                 functions most samples landed in
#
# Settings (environment variables; defaults in brackets):
#   DB [sqlite]          sqlite or postgres
#   MODE [unary]         unary (SendEmail) or batch (SendBatch)
#   N [20000]            emails in the burst
#   C [32]               concurrent callers, and mailgate's delivery.concurrency
#   SIZE [1500]          approximate message size, bytes
#   FREQ [999]           samples per second per thread
#   PG_URL [postgres://postgres@127.0.0.1:5432]  server for DB=postgres (a fresh database)
#   SERVER_BIN, LOADGEN_BIN  prebuilt binaries (default: target/release, built if SKIP_BUILD=0)
#   SKIP_BUILD [0]       1: do not run cargo
#   INFERNO_ROOT [$HOME/.cargo]  where `cargo install inferno` puts the flame graph tool when
#                        it is not on PATH (set SKIP_INSTALL=1 to skip the flame graph instead)
#   OUT_DIR [bench/results/profile-<UTC timestamp>-<db>-<mode>]
#   KEEP [0]             1: keep perf's own records as OUT_DIR/perf.data (and database.data)
#                        for `perf report -i` (tens of MB)
#   DB_PROFILE [1]       0: no database.txt on DB=postgres
#
# Needs perf (Debian: apt-get install linux-perf), and a kernel that lets this user sample
# (root, or kernel.perf_event_paranoid <= 1).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${OUT_DIR:-}" ] && [ "${OUT_DIR#/}" = "$OUT_DIR" ]; then OUT_DIR="$PWD/$OUT_DIR"; fi
cd "$ROOT"
DB=${DB:-sqlite}; MODE=${MODE:-unary}; N=${N:-20000}; C=${C:-32}; SIZE=${SIZE:-1500}
FREQ=${FREQ:-999}; SKIP_BUILD=${SKIP_BUILD:-0}; SKIP_INSTALL=${SKIP_INSTALL:-0}; KEEP=${KEEP:-0}
DB_PROFILE=${DB_PROFILE:-1}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}; PG_URL=${PG_URL%/}
INFERNO_ROOT=${INFERNO_ROOT:-$HOME/.cargo}
OUT_DIR=${OUT_DIR:-bench/results/profile-$(date -u +%Y%m%dT%H%M%SZ)-$DB-$MODE}
export PATH="$PATH:/usr/sbin:/sbin:$INFERNO_ROOT/bin"

log() { printf '[profile %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[profile] ERROR: %s\n' "$*" >&2; exit 1; }
case "$DB" in sqlite|postgres) ;; *) die "DB must be sqlite or postgres (got '$DB')" ;; esac
case "$MODE" in unary|batch) ;; *) die "MODE must be unary or batch (got '$MODE')" ;; esac
for tool in perf smtp-sink python3; do
  command -v "$tool" >/dev/null || die "missing $tool (Debian: apt-get install linux-perf postfix python3)"
done
[ "$DB" = sqlite ] || command -v psql >/dev/null || die "missing psql (Debian: postgresql-client)"
perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1 \
  || die "perf cannot sample here (run as root, or set kernel.perf_event_paranoid to 1 or less)"
if ! command -v inferno-flamegraph >/dev/null && [ "$SKIP_INSTALL" != 1 ]; then
  log "installing the flame graph tool: cargo install inferno --locked --root $INFERNO_ROOT"
  cargo install inferno --locked --root "$INFERNO_ROOT" >&2 || die "cargo install inferno failed"
fi

# shellcheck source=bench/burst.sh
. "$ROOT/bench/burst.sh"
binaries

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailgate-profile.XXXXXX")
chmod 755 "$WORK"
SINK_PID=""; SERVER_PID=""; DBNAME=""; DB_PERF_PID=""
cleanup() {
  set +e
  for pid in $SERVER_PID $SINK_PID $DB_PERF_PID; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
  [ -n "$DBNAME" ] && psql "$PG_URL/postgres" -qAt -c "DROP DATABASE IF EXISTS \"$DBNAME\" WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
start_sink

if [ "$DB" = postgres ]; then
  DBNAME="mailgate_profile_$$"
  psql "$PG_URL/postgres" -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DBNAME\"" >/dev/null
  url="$PG_URL/$DBNAME"
else
  url="sqlite://$WORK/data/mailgate.db"
fi
# Dirty pages of earlier work would be written back during the burst (see bench/run.sh).
sync

# DB=postgres: the whole machine is sampled from when mailgate is ready (burst.sh calls
# BURST_BEFORE) until the burst ends; database.txt keeps the PostgreSQL processes' samples.
# Without call stacks: Debian's PostgreSQL keeps no frame pointers, and copies of every
# process's stack would be far too much.
start_db_profile() {
  perf record -q -a -e cpu-clock -F "$FREQ" -o "$WORK/database.data" >/dev/null 2>&1 &
  DB_PERF_PID=$!
}
if [ "$DB" = postgres ] && [ "$DB_PROFILE" = 1 ]; then
  BURST_BEFORE=start_db_profile
fi

log "$N emails ($DB, $MODE, C=$C) into smtp-sink, mailgate under perf record at $FREQ Hz"
# Call stacks unwound from copies of the stack (DWARF): release builds keep no frame pointers.
burst "$SERVER_BIN" "$url" "$N" "$WORK" \
  perf record -q -e cpu-clock -F "$FREQ" --call-graph dwarf,16384 -o "$WORK/perf.data" --
if [ -n "$DB_PERF_PID" ]; then
  kill -INT "$DB_PERF_PID"; wait "$DB_PERF_PID" 2>/dev/null || true; DB_PERF_PID=""
fi
rate=$(python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["delivered_rate"]))' "$WORK/loadgen.json")
log "delivered $rate emails/s under the profiler; reading the samples"

mkdir -p "$OUT_DIR"
perf script -i "$WORK/perf.data" -F comm,tid,ip,sym,dso 2>/dev/null \
  | python3 "$ROOT/bench/profile_fold.py" "$OUT_DIR" "$DB" "$MODE" "$N" "$C" "$SIZE" "$rate"
if command -v inferno-flamegraph >/dev/null; then
  inferno-flamegraph --title "mailgate, $DB, $MODE, C=$C, N=$N" --countname samples \
    "$OUT_DIR/folded.txt" >"$OUT_DIR/flamegraph.svg"
else
  log "no inferno-flamegraph: no flame graph (cargo install inferno)"
fi
if [ -s "$WORK/database.data" ]; then
  {
    printf 'PostgreSQL server processes (named postgres) during the burst: %s, %s, N=%s, C=%s\n\n' \
      "$DB" "$MODE" "$N" "$C"
    perf report -i "$WORK/database.data" --stdio --comms postgres --sort sym \
      --percentage relative 2>/dev/null | grep '%' >"$WORK/database.syms" || true
    perf report -i "$WORK/database.data" --stdio --sort comm 2>/dev/null \
      | awk '/^# Samples:/ { n = $3 } $2 == "postgres" { p = $1 }
             END { printf "the machine: %s samples; processes named postgres: %s of them\n", n, p }'
    awk '{ sub(/%/, "", $1); if ($2 == "[k]") k += $1; else u += $1 }
         END { printf "user %.1f %%, kernel %.1f %% of the database'"'"'s samples\n\n", u, k }' \
      "$WORK/database.syms"
    echo "functions the samples landed in, % of the database's samples"
    head -40 "$WORK/database.syms"
  } >"$OUT_DIR/database.txt"
  grep -q '%' "$OUT_DIR/database.txt" \
    || echo "(no samples of a process named postgres: is the server on another machine?)" >>"$OUT_DIR/database.txt"
  [ "$KEEP" = 1 ] && mv "$WORK/database.data" "$OUT_DIR/database.data"
fi
[ "$KEEP" = 1 ] && mv "$WORK/perf.data" "$OUT_DIR/perf.data"
cat "$OUT_DIR/summary.txt"
log "written to $OUT_DIR"
