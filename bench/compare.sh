#!/usr/bin/env bash
# Compares two mailgate server builds in alternating full runs of bench/run.sh, and pools
# their runs: on a VM whose speed drifts by tens of percent within minutes, one run of each is
# not a comparison, and single bursts cannot show a change of 5-10 %.
#
#   BEFORE=/path/to/old/mailgate AFTER=target/release/mailgate bash bench/compare.sh
#   BEFORE=... AFTER=... PASSES=postgres ROUNDS=3 bash bench/compare.sh
#
# Each round runs bench/run.sh once with each server, in turns (before then after in odd
# rounds, after then before in even ones), so that a drift of the machine reaches both
# alike. Every run keeps its own result file (bench/results/<UTC timestamp>-compare-<label>-
# <round>.json, the usual table and JSON); then bench/compare.js pools the runs of each side:
# per pass (database and mode), the delivered rates of all its runs, their median and mean,
# the after/before ratio of the medians, the same ratio within each round, and the server's
# and the database's CPU per email. It prints a table and writes it as JSON
# (bench/results/<UTC timestamp>-compare.json, or OUT).
#
# Settings (environment variables; defaults in brackets):
#   BEFORE, AFTER        the two server binaries (required; build the old one from a checkout
#                        of its commit, e.g. `git worktree add ../old <rev>` and
#                        `cargo build --release --bin mailgate` there)
#   BEFORE_LABEL [before], AFTER_LABEL [after]   names in the file names and the table
#   ROUNDS [2]           rounds (each runs both servers)
#   REPEAT [3]           runs of each pass within a bench/run.sh run
#   PASSES ["sqlite postgres"], N, C, SIZE, RATE_ON, ...  passed on to bench/run.sh
#   OUT [bench/results/<UTC timestamp>-compare.json]
# bench/run.sh's other settings (SKIP_INSTALL, LOADGEN_BIN, PG_URL...) pass through; it is
# called with SKIP_BUILD=1, since both servers are given.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT="$PWD/$OUT"; fi
for side in BEFORE AFTER; do
  bin=${!side:-}
  [ -n "$bin" ] || { echo "compare.sh: set $side to a mailgate server binary" >&2; exit 2; }
  [ "${bin#/}" = "$bin" ] && bin="$PWD/$bin"
  [ -x "$bin" ] || { echo "compare.sh: $side=$bin is not an executable" >&2; exit 2; }
  printf -v "$side" '%s' "$bin"
done
BEFORE_LABEL=${BEFORE_LABEL:-before}; AFTER_LABEL=${AFTER_LABEL:-after}
ROUNDS=${ROUNDS:-2}; REPEAT=${REPEAT:-3}
case "$ROUNDS" in ''|*[!0-9]*|0) echo "compare.sh: ROUNDS must be a positive integer" >&2; exit 2 ;; esac
for label in "$BEFORE_LABEL" "$AFTER_LABEL"; do
  case "$label" in *[!A-Za-z0-9._-]*|'') echo "compare.sh: labels may hold letters, digits, '.', '_' and '-'" >&2; exit 2 ;; esac
done
[ "$BEFORE_LABEL" != "$AFTER_LABEL" ] || { echo "compare.sh: the two labels must differ" >&2; exit 2; }
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/bench/results/$STAMP-compare.json}
cd "$ROOT"

files=()
run_side() {
  local label=$1 bin=$2 round=$3 out
  out="$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-compare-$label-$round.json"
  echo "[compare $(date -u +%H:%M:%S)] round $round: $label ($bin)" >&2
  SERVER_BIN="$bin" SKIP_BUILD=1 REPEAT="$REPEAT" OUT="$out" bash "$ROOT/bench/run.sh" >&2
  files+=("$label=$round=$out")
}
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then
    run_side "$BEFORE_LABEL" "$BEFORE" "$round"
    run_side "$AFTER_LABEL" "$AFTER" "$round"
  else
    run_side "$AFTER_LABEL" "$AFTER" "$round"
    run_side "$BEFORE_LABEL" "$BEFORE" "$round"
  fi
done
node "$ROOT/bench/compare.js" "$OUT" "$BEFORE_LABEL" "$AFTER_LABEL" "${files[@]}"
