#!/usr/bin/env bash
# Every GPU row of docs/benchmarks.md in one call, in under 8 minutes on one H100/H200:
#   bash bench/gpu_suite.sh [OUT_DIR]        (default OUT_DIR: bench/results/gpu-<UTC date-time>)
# Writes OUT_DIR/<row>.json (each bench's own JSON), OUT_DIR/<row>.log and OUT_DIR/summary.md (device, date,
# versions, each row's exit status and time). A row that fails or runs past its time box is recorded as such
# and the suite goes on. Never needed by CI (the tests never need a GPU).
#
# What it needs: python3 with a CUDA build of torch, and thinktalk's test extra (transformers 5.23 is the
# reference). It uses ./.venv when that has a CUDA torch; otherwise it creates .venv with
# TORCH_SPEC (default: torch==2.13.0 from the cu128 index) through scripts/setup.sh — that step needs the
# package index; on a machine without network, prepare .venv first (or set PYTHON=/path/to/python).
#
# SMOKE=1 runs the same rows on the CPU at tiny shapes (a check of this script, not a measurement).
# COMPILE=1 adds a row: thinktalk bench with the speech decoders compiled (thinktalk.compile_speech), eager beside
# it; off by default because compiling the 7B Token2Wav may not fit the 8 minutes with the other rows.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
COMPILE=${COMPILE:-0}
if [ "$SMOKE" = 1 ]; then DEV=cpu; S7=tiny; S30=tiny; DT=fp32; else DEV=cuda; S7=7b; S30=30b-a3b; DT=bf16; fi
OUT=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"

PY=${PYTHON:-.venv/bin/python}
has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [ "$SMOKE" != 1 ] && ! has_cuda "$PY"; then
  if command -v nvidia-smi >/dev/null && [ -z "${PYTHON:-}" ]; then
    echo "== installing: torch (CUDA) + thinktalk[test] into .venv"
    TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"} \
      bash scripts/setup.sh test >"$OUT/install.log" 2>&1 || { echo "install failed, see $OUT/install.log"; exit 1; }
    PY=.venv/bin/python
  fi
  has_cuda "$PY" || { echo "no CUDA device visible to $PY: nothing to measure"; exit 1; }
fi
"$PY" -c 'import transformers, matplotlib' 2>/dev/null || "$PY" -m pip install -q -e ".[test]" >>"$OUT/install.log" 2>&1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# GPU suite — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  "$PY" - <<'EOF'
import platform, torch, transformers
name = "CPU (smoke run)"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    name = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"transformers {transformers.__version__}; {platform.machine()}")
EOF
  echo
  echo "| row | command | status | seconds |"
  echo "|---|---|---|---:|"
} >"$OUT/summary.md"

start_all=$SECONDS
row() {  # row NAME TIMEBOX_S COMMAND...
  local name=$1 box=$2
  shift 2
  echo "== $name (at most ${box} s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$box" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -eq 0 ] || status="exit $rc"
  [ $rc -eq 124 ] && status="timed out"
  echo "| $name | \`$*\` | $status | $((SECONDS - t0)) |" >>"$OUT/summary.md"
  tail -n 12 "$OUT/$name.log"
}

# Qwen2.5-Omni-7B Thinker decode + prompt forward, batch 1, bf16 (reference in the same process).
row thinker_7b 80 "$PY" bench/thinker.py --device $DEV --dtype $DT --shapes $S7 --new-tokens 64 --repeat 1 \
  --json "$OUT/thinker_7b.json"
# Qwen2.5-Omni-7B first audio, RTF, Talker codes/s (10 s audio prompt), and peak memory in the log.
row speech_qwen25_7b 130 "$PY" bench/qwen25_speech.py --device $DEV --shapes $S7 --repeats 1 --audio-seconds 10 \
  --json "$OUT/speech_qwen25_7b.json"
# thinktalk bench: end to end text + speech, first audio, Token2Wav, 7B shapes, side by side.
row bench_7b 90 sh -c "'$PY' -m thinktalk.cli bench --device $DEV --shapes $S7 --repeats 1 --json >'$OUT/bench_7b.json'"
if [ "$COMPILE" = 1 ]; then
  row bench_7b_compiled 240 sh -c "'$PY' -m thinktalk.cli bench --device $DEV --shapes $S7 --repeats 1 --compile \
    --skip-reference --json >'$OUT/bench_7b_compiled.json'"
fi
# Qwen3-Omni-30B-A3B Thinker decode, first audio, RTF, peak memory.
row qwen3_30b 200 "$PY" bench/qwen3_omni.py --device $DEV --shapes $S30 --json "$OUT/qwen3_30b.json"
# thinktalk serve on the GPU, 1..32 concurrent streaming clients (the embedded tiny model: the scheduler's
# behaviour; the 32-stream row at 30B shapes needs a real checkpoint, see docs/benchmarks.md).
row serve_load_tiny 60 "$PY" bench/serve_load.py --clients 1,8,32 --json --plot "$OUT" -- --device $DEV

echo >>"$OUT/summary.md"
echo "total: $((SECONDS - start_all)) s" >>"$OUT/summary.md"
cat "$OUT/summary.md"
