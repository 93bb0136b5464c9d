#!/usr/bin/env bash
# thinktalk-tiny from nothing, in order: data -> tokenizer + untrained model -> codec -> vision warm-up (the ViT on
# the pictures' shape/colour labels) -> Thinker stage2 (vision encoder frozen) -> [vision: LLM frozen, picture rows;
# not in the default STEPS] -> Thinker SFT -> Talker + code predictor (answers' renderings encoded by the
# codec) -> held-out evaluation -> ship (the model into thinktalk/assets/thinktalk-tiny, the package's default model).
# Every step writes under runs/tiny/ (RUN=... to change it); the model is runs/tiny/talker.
#
#   bash scripts/train_tiny.sh                      # everything (skips a step whose output is complete)
#   STEPS="data model" bash scripts/train_tiny.sh   # only some steps: data model codec warmup stage2 vision sft talker eval ship
#   NO_CODEC=1 bash scripts/train_tiny.sh           # keep the untrained Code2Wav (no codec training, no talker step)
#   SEED=1 N_TRAIN=6000 bash scripts/train_tiny.sh  # another data set
#
# Training steps run with `nice -n ${NICE:-10}`; recipe keys can be overridden per step with
# WARMUP_ARGS="--steps 200" STAGE2_ARGS="max_steps=100" VISION_ARGS=... SFT_ARGS="lr=5e-4" TALKER_ARGS=... CODEC_ARGS="max_steps=50".
# See docs/tiny-model.md.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUN=${RUN:-runs/tiny}
SEED=${SEED:-0}
N_TRAIN=${N_TRAIN:-6000}
N_VAL=${N_VAL:-105}
N_TEST=${N_TEST:-210}
STEPS=${STEPS:-"data model codec warmup stage2 sft talker eval ship"}
SHIP=${SHIP:-thinktalk/assets/thinktalk-tiny}
NICE=${NICE:-10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

want() { [[ " $STEPS " == *" $1 "* ]]; }
say() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

if want data; then
  if [[ -f "$RUN/data/manifest.json" ]]; then
    say "data: $RUN/data exists, kept"
  else
    say "data"
    $PY -m thinktalk.data --out "$RUN/data" --seed "$SEED" --n-train "$N_TRAIN" --n-val "$N_VAL" --n-test "$N_TEST"
  fi
fi

if want model; then
  say "tokenizer + untrained model"
  $PY -m thinktalk.data.model --data "$RUN/data" --out "$RUN/init" --seed "$SEED"
fi

if want codec; then
  if [[ -n "${NO_CODEC:-}" ]]; then
    say "codec skipped (NO_CODEC): base = init"
    rm -rf "$RUN/base" && cp -r "$RUN/init" "$RUN/base"
  else
    say "codec"
    # shellcheck disable=SC2086
    nice -n "$NICE" $PY -m thinktalk.codec train recipes/tiny/codec.yaml output_dir="$RUN/codec" data="[$RUN/data/answers]" ${CODEC_ARGS:-}
    rm -rf "$RUN/base"
    $PY -m thinktalk.codec export "$RUN/codec/codec" "$RUN/init" "$RUN/base"
  fi
fi

if want warmup; then
  say "vision warm-up (shape and colour labels of fresh pictures)"
  rm -rf "$RUN/warm"
  # shellcheck disable=SC2086
  nice -n "$NICE" $PY -m thinktalk.data.vision_warmup "$RUN/base" "$RUN/warm" --seed "$SEED" --steps 5000 ${WARMUP_ARGS:-}
fi
START="$RUN/base"
[[ -f "$RUN/warm/model.safetensors" ]] && START="$RUN/warm"

if want stage2; then
  say "Thinker stage2 (from $START; every Thinker part but the vision encoder)"
  # shellcheck disable=SC2086
  nice -n "$NICE" $PY -m thinktalk train recipes/tiny/stage2.yaml model="$START" data="$RUN/data/train.jsonl" \
    output_dir="$RUN/stage2" ${STAGE2_ARGS:-}
fi

THINKER="$RUN/stage2"
if want vision; then
  say "vision warm-up (LLM frozen; colour, shape and count rows)"
  $PY -c 'import json, sys
d = sys.argv[1]
with open(f"{d}/train.jsonl") as src, open(f"{d}/pictures.jsonl", "w") as dst:
    dst.writelines(line for line in src if json.loads(line)["task"] in ("colour", "shape", "count"))' "$RUN/data"
  # shellcheck disable=SC2086
  nice -n "$NICE" $PY -m thinktalk train recipes/tiny/vision.yaml model="$THINKER" data="$RUN/data/pictures.jsonl" \
    output_dir="$RUN/vision" ${VISION_ARGS:-}
fi
[[ -f "$RUN/vision/model.safetensors" ]] && THINKER="$RUN/vision"

if want sft; then
  say "Thinker SFT (from $THINKER)"
  # shellcheck disable=SC2086
  nice -n "$NICE" $PY -m thinktalk train recipes/tiny/sft.yaml model="$THINKER" data="$RUN/data/train.jsonl" \
    output_dir="$RUN/sft" ${SFT_ARGS:-}
fi

MODEL="$RUN/sft"
if want talker; then
  if [[ -n "${NO_CODEC:-}" ]]; then
    say "talker skipped (NO_CODEC: no codec to encode the answers with)"
  else
    say "Talker + code predictor (answers encoded by the codec)"
    # shellcheck disable=SC2086
    nice -n "$NICE" $PY -m thinktalk train recipes/tiny/talker.yaml model="$RUN/sft" data="$RUN/data/train.jsonl" \
      codec_model="$RUN/codec/codec" output_dir="$RUN/talker" ${TALKER_ARGS:-}
  fi
fi
[[ -f "$RUN/talker/model.safetensors" ]] && MODEL="$RUN/talker"

if want eval; then
  say "held-out evaluation"
  $PY -m thinktalk eval "$MODEL" "$RUN/data/test.jsonl" --speech 20 --out "$RUN/eval_test.json"
  $PY -m thinktalk eval "$MODEL" "$RUN/data/val.jsonl" --out "$RUN/eval_val.json"
  for run in stage2 vision sft talker; do
    if [[ -d "$RUN/$run" ]]; then $PY -m thinktalk plot "$RUN/$run" || true; fi
  done
fi

if want ship; then
  say "ship: $MODEL -> $SHIP (the model files only, no training records)"
  rm -rf "$SHIP" && mkdir -p "$SHIP"
  for f in config.json model.safetensors generation_config.json tokenizer.json tokenizer_config.json vocab.json merges.txt \
           chat_template.json preprocessor_config.json video_preprocessor_config.json spk_dict.pt; do
    if [[ -f "$MODEL/$f" ]]; then cp "$MODEL/$f" "$SHIP/"; fi
  done
  du -sh "$SHIP"
fi
