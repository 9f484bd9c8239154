#!/usr/bin/env bash
# mailgate's instructions per email, counted by valgrind's callgrind: a figure that the load of
# the machine does not move (a busy or throttled VM moves every timing of bench/run.sh by tens
# of percent from one run to the next; this count moves by about one percent).
#
#   bash bench/instructions.sh                          # the current tree's release build
#   BASE_BIN=/path/to/old/mailgate bash bench/instructions.sh   # and a reference, side by side
#
# For each server binary it runs two bursts (N1 and N2 emails: SendEmail calls from C callers,
# or SendBatch calls of 1,000 emails, at most min(C, 4) in flight) into
# Postfix's smtp-sink, each on a fresh database and a fresh server under callgrind, and reports
# (instructions of the N2 run - instructions of the N1 run) / (N2 - N1): the instructions
# per email, without the start and the shutdown. It also keeps the N2 run's profile for
# `callgrind_annotate`.
#
# Settings (environment variables; defaults in brackets):
#   DB [postgres]        postgres or sqlite
#   MODE [unary]         unary (SendEmail) or batch (SendBatch)
#   N1 [1000], N2 [3000] the two bursts
#   C [32]               concurrent callers, and mailgate's delivery.concurrency
#   SIZE [1500]          approximate message size, bytes
#   PG_URL [postgres://postgres@127.0.0.1:5432]  server for DB=postgres (a fresh database per run)
#   SERVER_BIN, LOADGEN_BIN  prebuilt binaries (default: target/release, built if SKIP_BUILD=0)
#   BASE_BIN             a second server binary to count the same way (the reference)
#   LABEL [current], BASE_LABEL [reference]  what the result file calls the two binaries
#                        (a commit, say; the file records no paths)
#   SKIP_BUILD [0]       1: do not run cargo
#   OUT [bench/results/instructions-<UTC timestamp>.json]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT="$PWD/$OUT"; fi
cd "$ROOT"
DB=${DB:-postgres}; MODE=${MODE:-unary}; N1=${N1:-1000}; N2=${N2:-3000}; C=${C:-32}; SIZE=${SIZE:-1500}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}; PG_URL=${PG_URL%/}
SKIP_BUILD=${SKIP_BUILD:-0}; BASE_BIN=${BASE_BIN:-}
OUT=${OUT:-bench/results/instructions-$(date -u +%Y%m%dT%H%M%SZ).json}
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '[instructions %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[instructions] ERROR: %s\n' "$*" >&2; exit 1; }
case "$DB" in sqlite|postgres) ;; *) die "DB must be sqlite or postgres (got '$DB')" ;; esac
case "$MODE" in unary|batch) ;; *) die "MODE must be unary or batch (got '$MODE')" ;; esac
[ "$N2" -gt "$N1" ] || die "N2 must be larger than N1"
for tool in valgrind callgrind_annotate smtp-sink python3; do
  command -v "$tool" >/dev/null || die "missing $tool (Debian: apt-get install valgrind postfix python3)"
done
[ "$DB" = sqlite ] || command -v psql >/dev/null || die "missing psql (Debian: postgresql-client)"

# shellcheck source=bench/burst.sh
. "$ROOT/bench/burst.sh"
binaries

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailgate-instr.XXXXXX")
chmod 755 "$WORK"
SINK_PID=""; SERVER_PID=""; DBS=()
cleanup() {
  set +e
  # Only the processes still running that this script started.
  for pid in $SERVER_PID $SINK_PID; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
  for db in "${DBS[@]}"; do
    psql "$PG_URL/postgres" -qAt -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
start_sink

# count BIN N PROFILE: runs one server under callgrind that accepts and delivers N emails,
# keeps its profile as PROFILE and sets TOTAL to its instruction count.
count() {
  local bin=$1 n=$2 out=$3 run url db=""
  run="$WORK/run-$RANDOM"; mkdir -p "$run"
  if [ "$DB" = postgres ]; then
    db="mailgate_instr_$$_$RANDOM"; DBS+=("$db")
    psql "$PG_URL/postgres" -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$db\"" >/dev/null
    url="$PG_URL/$db"
  else
    url="sqlite://$run/data/mailgate.db"
  fi
  burst "$bin" "$url" "$n" "$run" valgrind -q --tool=callgrind --callgrind-out-file="$out"
  [ -n "$db" ] && psql "$PG_URL/postgres" -qAt -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  # callgrind writes "summary: <Ir>" and "totals: <Ir>" into its output file.
  TOTAL=$(awk '/^(totals|summary):/ {print $2; exit}' "$out")
  [ -n "$TOTAL" ] || die "no instruction count in $out"
}

declare -A PER_EMAIL
measure() {
  local name=$1 bin=$2 i1 i2 profile="${TMPDIR:-/tmp}/mailgate-$1.callgrind.out"
  log "$name: $N1 emails under callgrind ($bin)"
  count "$bin" "$N1" "$WORK/$name-$N1.callgrind.out"; i1=$TOTAL
  log "$name: $N2 emails under callgrind"
  count "$bin" "$N2" "$profile"; i2=$TOTAL
  PER_EMAIL[$name]=$(( (i2 - i1) / (N2 - N1) ))
  log "$name: $i1 and $i2 instructions: ${PER_EMAIL[$name]} per email (the $N2-email run's profile: $profile)"
}

measure current "$SERVER_BIN"
[ -n "$BASE_BIN" ] && measure reference "$BASE_BIN"

mkdir -p "$(dirname "$OUT")"
ratio=null
[ -n "$BASE_BIN" ] && ratio=$(awk -v a="${PER_EMAIL[current]}" -v b="${PER_EMAIL[reference]}" 'BEGIN { printf "%.3f", a / b }')
cat >"$OUT" <<JSON
{"db": "$DB", "mode": "$MODE", "n1": $N1, "n2": $N2, "concurrency": $C, "size": $SIZE,
 "server": "${LABEL:-current}", "instructions_per_email": ${PER_EMAIL[current]},
 "reference": $( [ -n "$BASE_BIN" ] && echo "\"${BASE_LABEL:-reference}\"" || echo null ),
 "reference_instructions_per_email": ${PER_EMAIL[reference]:-null}, "ratio_to_reference": $ratio}
JSON
printf 'mailgate instructions per email (%s, %s, C=%s, %s-byte messages)\n' "$DB" "$MODE" "$C" "$SIZE"
printf '  current    %10s  %s\n' "${PER_EMAIL[current]}" "$SERVER_BIN"
[ -n "$BASE_BIN" ] && printf '  reference  %10s  %s\n  ratio      %10s\n' "${PER_EMAIL[reference]}" "$BASE_BIN" "$ratio"
log "results written to $OUT"
