#!/usr/bin/env bash
# Set up thinktalk in ./.venv.   usage: bash scripts/setup.sh [run|test]
#   run  (default): the package and its runtime dependencies
#   test          : + the test extra (transformers==5.23.0 reference, openai client, selenium) and the
#                   system tools the tests use (espeak-ng, sox, chromium, chromedriver)
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, the CPU build; on a GPU machine
# use e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
if [ "$mode" = test ]; then
  need=()
  command -v espeak-ng >/dev/null || need+=(espeak-ng)
  command -v sox >/dev/null || need+=(sox)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC2086
.venv/bin/pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
if [ "$mode" = test ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
else
  .venv/bin/pip install -q --disable-pip-version-check -e .
fi
echo "thinktalk is set up in .venv ($mode)"
