#!/usr/bin/env bash
# The GPU checks in one script, for a machine lent for a few minutes: the CUDA tests, training and
# decoding throughput against HF Marian, and optionally the Multi30k recipe trained on the GPU, then
# averaged and scored.
#
#   bash benchmarks/gpu.sh OUT_DIR            # tests and benchmarks: ~5 minutes on an H200
#   bash benchmarks/gpu.sh OUT_DIR MINUTES    # and the recipe, MINUTES of training (+ ~2 minutes)
#
# From the repository root, with the machine's python3 (a torch with CUDA, the project's dependencies;
# the package need not be installed). Each stage has a time limit and a failed stage does not stop
# the next; each writes OUT_DIR/STAGE.log and prints its last lines.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [MINUTES]}
minutes=${2:-0}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: rc $? in $((SECONDS - start)) s"
    tail -n 30 "$out/$name.log" | cut -c1-300
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
lscpu | grep -m1 'Model name'
stage tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
stage train 150 python3 benchmarks/train_throughput.py --device cuda --configs base --precisions fp32,bf16 \
    --max-tokens 25000 --steps 10 --warmup 3 --passes 2
stage decode 200 python3 benchmarks/decode_throughput.py --device cuda --configs base \
    --engines aiayn-fp32,aiayn-bf16,hf-fp32,hf-bf16 --rounds 2  # (the host CPU's launches: noisy)
if [ "$minutes" -gt 0 ]; then
    run=$(mktemp -d)/multi30k
    stage recipe $((minutes * 60 + 90)) python3 -m aiayn train translation --preset multi30k --lr 5e-3 \
        --warmup 2000 --device cuda --out "$run" --max-minutes "$minutes" --eval-every 1000 --keep-last 5
    cp "$run/metrics.jsonl" "$out/recipe-metrics.jsonl" 2>/dev/null
    stage average 60 python3 -m aiayn average "$run" --last 5 --out "$run-avg5" --alpha 1.0
    stage evaluate 120 python3 -m aiayn evaluate --model "$run-avg5" --device cuda
fi
