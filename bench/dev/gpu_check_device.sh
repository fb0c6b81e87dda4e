#!/usr/bin/env bash
# The device-machine side of bench/dev/gpu_check.py, as run for bench/results/gpu_check_h200.json (one call).
#
# It expects, beside the checkout (copied there by the device tool, with `carry: [".whl", ".gpu"]`):
#   .whl/        wheels the GPU image lacks: bitsandbytes 0.50.2, datasets 5.2.0 (and 4.8.5 in .whl/alt for an
#                older pyarrow), dill, multiprocess, gguf, optimum-quanto
#   .gpu/shape/  config.json (SmolLM2-135M, 30 layers) + tokenizer files; weights are drawn at random there
#   .gpu/data/   stsb/sts-dev.csv, snli/snli_triplets_devtest.jsonl, scifact/ (a copy of ../shared/data subsets)
# and writes its logs and JSON to $OUT. On an ordinary CUDA machine with `pip install -e .[dev,gpu]` done, the same
# checks are: pytest on the files below, then
#   EMBEDFORGE_DATA=../shared/data python -m bench.dev.gpu_check --out DIR --shape SHAPE_DIR
set -u
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
pa=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
W=$(ls .whl/*.whl | grep -v datasets)
if [ "$pa" -ge 24 ]; then W="$W .whl/datasets-5.2.0-py3-none-any.whl"; else W="$W .whl/alt/datasets-4.8.5-py3-none-any.whl"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W || exit 3
export PYTHONPATH=$PWD:/tmp/site EMBEDFORGE_DATA=$PWD/.gpu/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== setup done $(( $(date +%s) - T0 )) s"
timeout 120 python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 100 -rs tests/convert/test_bidirectional.py tests/convert/test_pooling_embedder.py tests/convert/test_train_stages.py > $OUT/pytest2.log 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest2.log | tail -8
echo "== tests done $(( $(date +%s) - T0 )) s"
left=$(( 400 - ($(date +%s) - T0) ))
timeout $left python3 -m bench.dev.gpu_check --out /tmp/gc2 --shape .gpu/shape --sections bidirectional,encode,train1b > $OUT/gpu_check2.log 2>&1
echo "gpu_check rc=$?"; cp /tmp/gc2/results.json $OUT/gpu_check2.json 2>/dev/null; grep -E "encode (short|long)|train llama1b|Error" $OUT/gpu_check2.log | cut -c1-400 | tail -8
echo "== all done $(( $(date +%s) - T0 )) s"
