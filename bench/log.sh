#!/usr/bin/env bash
# mailgate email-log benchmark: loads a tenant's log of ENTRIES entries (plus NOISE entries of
# 20 other tenants) into a fresh SQLite file and a fresh PostgreSQL database, starts mailgate
# on each, and measures ListEmailLogs (first page; first page of SENT; a status + time filter
# 20 pages deep; a recipient filter) and GetEmailStats (30 days, day buckets) over gRPC, with
# ListProviderPresets as the same-run reference. Prints p50/p99/max and the query plans; writes JSON.
#
#   bash bench/log.sh
#
# Settings (environment variables; defaults in brackets):
#   ENTRIES [1000000]   entries of the measured tenant (spread over 60 days)
#   NOISE [200000]      entries of the other tenants
#   SAMPLES [200]       calls per measured query (GetEmailStats: a quarter)
#   PASSES ["sqlite postgres"]
#   PG_URL [postgres://postgres@127.0.0.1:5432]  server for the postgres pass (a database
#                       mailgate_logbench is created and dropped)
#   OUT_DIR [bench/results]  where log-<backend>-<UTC timestamp>.json go
#   SKIP_BUILD [0]      1: use target/release/examples/logbench as it is
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ENTRIES=${ENTRIES:-1000000}
NOISE=${NOISE:-200000}
SAMPLES=${SAMPLES:-200}
PASSES=${PASSES:-sqlite postgres}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
PG_URL=${PG_URL%/}
OUT_DIR=${OUT_DIR:-bench/results}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
TARGET=${CARGO_TARGET_DIR:-target}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --locked --example logbench
fi
BIN="$TARGET/release/examples/logbench"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "machine: $(nproc) cores, $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)"
for pass in $PASSES; do
  case "$pass" in
    sqlite) url="sqlite://$WORK/log.db?mode=rwc" ;;
    postgres)
      psql "$PG_URL/postgres" -q -c "DROP DATABASE IF EXISTS mailgate_logbench" \
        -c "CREATE DATABASE mailgate_logbench"
      url="$PG_URL/mailgate_logbench" ;;
    *) echo "log.sh: unknown pass '$pass'" >&2; exit 2 ;;
  esac
  "$BIN" --database-url "$url" --entries "$ENTRIES" --noise "$NOISE" --samples "$SAMPLES" \
    --out "$OUT_DIR/log-$pass-$STAMP.json"
  if [ "$pass" = postgres ]; then
    psql "$PG_URL/postgres" -q -c "DROP DATABASE IF EXISTS mailgate_logbench"
  fi
done
