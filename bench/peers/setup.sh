#!/usr/bin/env bash
# Create the virtual environments of the peer tools (llmcompressor, GPTQModel, optimum-quanto, bitsandbytes), one
# each, under out/peers/ (git-ignored). Idempotent: a venv whose stamp matches its pins is left alone;
# change a pin and re-run to rebuild it. Pip only (PyPI), CPU torch; nothing from a model hub.
#
#   bash bench/peers/setup.sh              # all four
#   bash bench/peers/setup.sh quanto       # one of them (llmcompressor, gptqmodel, quanto, bnb)
#
# Verified on Python 3.11, 2026-11 (see bench/peers/README.md). torch 2.13.0 is installed first so
# pip keeps the CPU build; the peers' own requirements then resolve against it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="${LOWBIT_PEERS_DIR:-$ROOT/out/peers}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

TORCH_PIN="torch==2.13.0"
# Exact versions the runners were verified with (the rest resolved by pip; see pip-freeze.txt in
# each venv after setup).
LLMCOMPRESSOR_PINS=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 accelerate==1.15.0
                    datasets==5.2.0 safetensors==0.8.0)
GPTQMODEL_PINS=(gptqmodel==7.6.0 transformers==5.23.0 accelerate==1.15.0 torchao==0.18.0 safetensors==0.8.0)
# optimum-quanto 0.2.7 is the latest release on PyPI; it asks for torch>=2.6 only. Its CPU C++
# extension (int2/int4 unpacking) is JIT-built with ninja only if used: the W8A8 runner never does.
QUANTO_PINS=(optimum-quanto==0.2.7 transformers==5.23.0 accelerate==1.15.0 safetensors==0.8.0 tqdm==4.70.1)
# bitsandbytes' CPU backend (4-bit NF4/FP4 and LLM.int8), loaded through transformers' BitsAndBytesConfig.
BNB_PINS=(bitsandbytes==0.50.2 transformers==5.23.0 accelerate==1.15.0 safetensors==0.8.0 tqdm==4.70.1)

make_venv() {  # name, pins...
  local name="$1"; shift
  local dir="$PEERS/$name" stamp="$PEERS/$name/.lowbit-peer-stamp"
  local want="$TORCH_PIN $* python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "[peers] $name: up to date ($dir)"
    return
  fi
  echo "[peers] $name: creating $dir"
  rm -rf "$dir"
  mkdir -p "$PEERS"
  "$PYTHON" -m venv "$dir"
  # CPU torch first, then the tool with the same torch pinned so pip cannot swap it.
  "$dir/bin/python" -m pip install --quiet "$TORCH_PIN"
  "$dir/bin/python" -m pip install --quiet "$TORCH_PIN" "$@"
  "$dir/bin/python" -m pip freeze > "$dir/pip-freeze.txt"
  "$dir/bin/python" - "$name" <<'PY'
import sys, importlib
mod = {"llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel", "quanto": "optimum.quanto",
       "bnb": "bitsandbytes"}[sys.argv[1]]
import torch
importlib.import_module(mod)
print(f"[peers] {mod} imports; torch {torch.__version__}")
PY
  echo "$want" > "$stamp"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(llmcompressor gptqmodel quanto bnb)
for t in "${targets[@]}"; do
  case "$t" in
    llmcompressor) make_venv llmcompressor "${LLMCOMPRESSOR_PINS[@]}" ;;
    gptqmodel) GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}" make_venv gptqmodel "${GPTQMODEL_PINS[@]}" ;;
    quanto) make_venv quanto "${QUANTO_PINS[@]}" ;;
    bnb) make_venv bnb "${BNB_PINS[@]}" ;;
    *) echo "unknown peer '$t' (llmcompressor, gptqmodel, quanto, bnb)" >&2; exit 2 ;;
  esac
done
