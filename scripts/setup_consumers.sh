#!/usr/bin/env bash
# Create .venv-consumers: the consumers an export is served with (fastembed, onnxruntime, tokenizers, numpy,
# faiss-cpu, qdrant-client), without torch or embedforge, for tests/consumers. Idempotent: a second run only
# reinstalls when scripts/consumers-requirements.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CONSUMERS_VENV:-.venv-consumers}
stamp="$VENV/.embedforge-consumers-$(cat scripts/consumers-requirements.txt scripts/setup_consumers.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r scripts/consumers-requirements.txt
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "error: $VENV must not contain torch (the consumers are tested without it)" >&2
  exit 1
fi
rm -f "$VENV"/.embedforge-consumers-*
touch "$stamp"
echo "consumer environment installed in $VENV"
