#!/usr/bin/env bash
# PostgreSQL's instructions per email, counted by valgrind's callgrind: the database's side of
# what bench/instructions.sh counts for mailgate. A busy or throttled VM moves the database's
# CPU time per email by tens of percent from run to run; this count moves by a few percent
# (the size of the writers' groups, which the timing of the run decides, changes it a little).
#
#   bash bench/pg-instructions.sh                        # the current schema
#   SCHEMA_SQL=change.sql bash bench/pg-instructions.sh  # with a schema change applied first
#
# It starts a private PostgreSQL cluster of its own (initdb in a temporary folder, a free port,
# no TLS, autovacuum off) with every server process under callgrind, runs mailgate (natively)
# on it, sends N emails into Postfix's smtp-sink and stops everything; the instructions of all
# of the cluster's processes are added up. It does so for N1 and N2 emails and reports
# (instructions of the N2 run - instructions of the N1 run) / (N2 - N1): the database's
# instructions per email, without its start, mailgate's migrations and the shutdown.
#
# Settings (environment variables; defaults in brackets):
#   MODE [unary]         unary (SendEmail) or batch (SendBatch)
#   N1 [1000], N2 [4000] the two bursts
#   C [32]               concurrent callers, and mailgate's delivery.concurrency
#   SIZE [1500]          approximate message size, bytes
#   SCHEMA_SQL           a SQL file run on mailgate's database after its migrations and before
#                        the burst (to measure a schema change before writing its migration)
#   PG_BINDIR            PostgreSQL's server programs (default: `pg_config --bindir`, then the
#                        newest /usr/lib/postgresql/*/bin)
#   SERVER_BIN, LOADGEN_BIN  prebuilt binaries (default: target/release, built if SKIP_BUILD=0)
#   SKIP_BUILD [0]       1: do not run cargo
#   KEEP [0]             1: keep the profiles of the N2 run (their folder is printed)
#   OUT [bench/results/pg-instructions-<UTC timestamp>.json]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT="$PWD/$OUT"; fi
if [ -n "${SCHEMA_SQL:-}" ] && [ "${SCHEMA_SQL#/}" = "$SCHEMA_SQL" ]; then SCHEMA_SQL="$PWD/$SCHEMA_SQL"; fi
cd "$ROOT"
MODE=${MODE:-unary}; N1=${N1:-1000}; N2=${N2:-4000}; C=${C:-32}; SIZE=${SIZE:-1500}
SKIP_BUILD=${SKIP_BUILD:-0}; KEEP=${KEEP:-0}; SCHEMA_SQL=${SCHEMA_SQL:-}
OUT=${OUT:-bench/results/pg-instructions-$(date -u +%Y%m%dT%H%M%SZ).json}
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '[pg-instructions %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[pg-instructions] ERROR: %s\n' "$*" >&2; exit 1; }
case "$MODE" in unary|batch) ;; *) die "MODE must be unary or batch (got '$MODE')" ;; esac
[ "$N2" -gt "$N1" ] || die "N2 must be larger than N1"
[ -z "$SCHEMA_SQL" ] || [ -f "$SCHEMA_SQL" ] || die "SCHEMA_SQL not found: $SCHEMA_SQL"
for tool in valgrind smtp-sink psql python3; do
  command -v "$tool" >/dev/null || die "missing $tool (Debian: apt-get install valgrind postfix postgresql python3)"
done
if [ -z "${PG_BINDIR:-}" ]; then
  PG_BINDIR=$(pg_config --bindir 2>/dev/null || true)
  [ -x "$PG_BINDIR/initdb" ] || PG_BINDIR=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
fi
[ -x "$PG_BINDIR/initdb" ] && [ -x "$PG_BINDIR/postgres" ] \
  || die "PostgreSQL's initdb and postgres not found (set PG_BINDIR; Debian: apt-get install postgresql)"

# shellcheck source=bench/burst.sh
. "$ROOT/bench/burst.sh"
binaries

# PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` user.
as_db_user() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a postgres user"
    su postgres -s /bin/bash -c "$*"
  else
    bash -c "$*"
  fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailgate-pg-instr.XXXXXX")
chmod 755 "$WORK"
SINK_PID=""; SERVER_PID=""; PG_PID=""; PG_DATA=""
stop_cluster() {
  [ -n "$PG_DATA" ] || return 0
  as_db_user "'$PG_BINDIR/pg_ctl' -D '$PG_DATA' -m fast -w -t 120 stop" >/dev/null 2>&1 \
    || { [ -n "$PG_PID" ] && kill "$PG_PID" 2>/dev/null; }
  [ -n "$PG_PID" ] && wait "$PG_PID" 2>/dev/null
  PG_PID=""; PG_DATA=""
}
cleanup() {
  set +e
  for pid in $SERVER_PID $SINK_PID; do kill "$pid" 2>/dev/null; done
  stop_cluster
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
start_sink
schema_change() {
  psql "$1" -qAt -v ON_ERROR_STOP=1 -f "$SCHEMA_SQL" >/dev/null || die "SCHEMA_SQL failed"
}
[ -z "$SCHEMA_SQL" ] || BURST_BEFORE=schema_change

# count N PROFILES: a fresh cluster under callgrind, mailgate on it, N emails; sets TOTAL to
# the instructions of all the cluster's processes, whose profiles go to the folder PROFILES.
count() {
  local n=$1 profiles=$2 run pg_port f v
  run="$WORK/run-$RANDOM"; mkdir -p "$run" "$profiles"; chmod 777 "$run" "$profiles"
  PG_DATA="$run/pgdata"
  as_db_user "'$PG_BINDIR/initdb' -D '$PG_DATA' -A trust -U postgres" >"$run/initdb.log" 2>&1 \
    || { tail -5 "$run/initdb.log" >&2; die "initdb failed"; }
  pg_port=$(free_port)
  as_db_user "exec valgrind -q --tool=callgrind --callgrind-out-file='$profiles/callgrind.%p' \
    '$PG_BINDIR/postgres' -D '$PG_DATA' -p $pg_port -k '$run' -c listen_addresses=127.0.0.1 \
    -c autovacuum=off" >"$run/postgres.log" 2>&1 &
  PG_PID=$!
  for _ in $(seq 600); do
    psql "postgres://postgres@127.0.0.1:$pg_port/postgres" -qAt -c 'SELECT 1' >/dev/null 2>&1 && break
    kill -0 "$PG_PID" 2>/dev/null || { tail -5 "$run/postgres.log" >&2; die "PostgreSQL did not start"; }
    sleep 0.2
  done
  psql "postgres://postgres@127.0.0.1:$pg_port/postgres" -qAt -v ON_ERROR_STOP=1 \
    -c 'CREATE DATABASE mailgate' >/dev/null
  burst "$SERVER_BIN" "postgres://postgres@127.0.0.1:$pg_port/mailgate" "$n" "$run/mailgate"
  stop_cluster
  TOTAL=0
  for f in "$profiles"/callgrind.*; do
    # callgrind writes "summary: <Ir>" and "totals: <Ir>" into each process's file.
    v=$(awk '/^(totals|summary):/ {print $2; exit}' "$f")
    TOTAL=$((TOTAL + ${v:-0}))
  done
  [ "$TOTAL" -gt 0 ] || die "no instruction count in $profiles"
}

log "$N1 emails, the cluster under callgrind"
count "$N1" "$WORK/profiles-$N1"; i1=$TOTAL
log "$N2 emails, the cluster under callgrind"
KEPT="$WORK/profiles-$N2"
[ "$KEEP" = 1 ] && KEPT=$(mktemp -d "${TMPDIR:-/tmp}/mailgate-pg-profiles.XXXXXX")
count "$N2" "$KEPT"; i2=$TOTAL
PER_EMAIL=$(( (i2 - i1) / (N2 - N1) ))
log "$i1 and $i2 instructions: $PER_EMAIL per email"

mkdir -p "$(dirname "$OUT")"
cat >"$OUT" <<JSON
{"db": "postgres", "mode": "$MODE", "n1": $N1, "n2": $N2, "concurrency": $C, "size": $SIZE,
 "postgres": "$("$PG_BINDIR/postgres" --version | sed 's/"//g')",
 "schema_sql": $( [ -n "$SCHEMA_SQL" ] && echo "\"$(basename "$SCHEMA_SQL")\"" || echo null ),
 "postgres_instructions_per_email": $PER_EMAIL}
JSON
printf 'PostgreSQL instructions per email (%s, C=%s, %s-byte messages%s): %s\n' "$MODE" "$C" "$SIZE" \
  "$( [ -n "$SCHEMA_SQL" ] && echo ", with $(basename "$SCHEMA_SQL")" )" "$PER_EMAIL"
[ "$KEEP" = 1 ] && log "the $N2-email run's profiles: $KEPT (callgrind_annotate <file>)"
log "results written to $OUT"
