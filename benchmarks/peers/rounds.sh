#!/usr/bin/env bash
# Interleaved rounds on a contended machine: every contender once per round, in a fixed
# round-robin order, 1 torch thread, no wait-for-idle (foreign CPU still recorded), no re-runs.
#   ROUNDS=5 TAG=busy ./rounds.sh          -> results/rounds_<TAG>.jsonl, results/loadavg_<TAG>.txt
#   PY_MMCLIN=./venv-mm/bin/python          (interpreter for the mmclin_* contenders, if a 2nd venv)
set -uo pipefail
cd "$(dirname "$0")"
ROUNDS=${ROUNDS:-5}
TAG=${TAG:-busy}
REP_OFFSET=${REP_OFFSET:-0}   # e.g. 100 for the quiet rounds (rep numbers name the log files)
PY_PEERS=${PY_PEERS:-./venv/bin/python}
PY_MMCLIN=${PY_MMCLIN:-$PY_PEERS}
CONTENDERS=${CONTENDERS:-"bare_tensor mmclin_default mmclin_closest mmclin_mlp mmclin_custom lightning_batched lightning widedeep fusilli"}
export MMCLIN_PERF_THREADS=${MMCLIN_PERF_THREADS:-1}
export MMCLIN_PERF_MAX_WAIT=0      # do not wait for an idle machine (it never comes); busy cores still sampled
export MMCLIN_PERF_RETRIES=0       # no re-runs: contamination is shared by all contenders of a round
RAW=results/rounds_${TAG}.jsonl
LOAD=results/loadavg_${TAG}.txt
mkdir -p results/logs
cat data/*.parquet > /dev/null
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r start $(date +%FT%T) $(cat /proc/loadavg)" | tee -a "$LOAD"
  for c in $CONTENDERS; do
    case $c in mmclin*|*_mmvenv) PY=$PY_MMCLIN ;; *) PY=$PY_PEERS ;; esac
    PY=$PY "$PY" measure.py "$c" "$((r + REP_OFFSET))" --raw "$RAW"
  done
  echo "round $r end   $(date +%FT%T) $(cat /proc/loadavg)" | tee -a "$LOAD"
done
