#!/usr/bin/env bash
# The GPU figures of bench/BENCHMARKS.md in one call, on one GPU with torch (CUDA),
# transformers, peft and pyarrow (no Ray, no vLLM, nothing downloaded):
#   bench/bench_gpu.py          the trainer's bf16 step on 0.5B and 8B shapes: full vs lean,
#                               layouts, FSDP on a one-worker NCCL group, LoRA, bf16 drift
#   bench/bench_trl_compare.py  shape g: this trainer's layouts vs TRL's DPOTrainer, bf16
# TRL's variant needs trl and datasets: where pip cannot reach an index, put their wheels (and
# dill, multiprocess) in .whl/ and they are installed into /tmp/site first.
#     OUT=/tmp/gpu_bench bash bench/gpu.sh
set -u
out=${OUT:-/tmp/gpu_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv \
    | tee "$out/nvidia-smi.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/nvidia-smi.txt"
python3 bench/bench_gpu.py --pairs 16 --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
python3 bench/bench_trl_compare.py --device cuda --dtype bfloat16 --shapes g --rounds 1 \
    --threads 8 --tol 0.05 --work /tmp/trl_g --variants padded,packed,shared_prompt,trl 2>&1 \
    | tee "$out/trl_compare.log"
cp /tmp/trl_g/report-*.json "$out/" 2>/dev/null
