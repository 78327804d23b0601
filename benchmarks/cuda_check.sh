#!/usr/bin/env bash
# The CUDA checks, in one run on a machine with an NVIDIA GPU, from the repository root:
#   benchmarks/cuda_check.sh [OUT_DIR]
# 1. the parity, quantization, MoE-budget, engine and serving tests with every model on the GPU
#    (HEARTHLM_DEVICE=cuda: every LLM the tests build lands there; transformers' references stay on the CPU);
# 2. the decode benchmark on the GPU: hearthlm and transformers, same random-weight checkpoints, same run.
# Wheels in .whl/ (packages the machine lacks) are installed into /tmp/site first. Logs and JUnit XML go to OUT_DIR.
set -u
out=${1:-${OUT:-/tmp/cuda-check}}
mkdir -p "$out"
export HEARTHLM_DEVICE=cuda PYTHONUNBUFFERED=1 HEARTHLM_KERNELS=0  # no CPU kernels to build: the GPU runs the model
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(0))" || exit 1

tests=(tests/test_parity.py tests/test_quant.py tests/test_moe_budget.py tests/test_engine.py tests/test_server_engine.py
       tests/test_speculative.py tests/test_mtp_drafter.py)
timeout "${TEST_SECONDS:-300}" python3 -m pytest -o addopts="" -q -p no:cacheprovider --tb=short -rfE \
    --junitxml="$out/cuda-tests.xml" "${tests[@]}" 2>&1 | tee "$out/cuda-tests.log"

timeout "${BENCH_SECONDS:-180}" python3 benchmarks/decode.py --device cuda --models llama3.2-1b,qwen2.5-0.5b \
    --dtypes bfloat16 --tf-dtypes bfloat16 --runs 3 --quiet-wait 0 --cache-dir /tmp/bench-ckpt 2>&1 \
    | tee "$out/cuda-decode.log"

# where a decode step's time goes on the GPU (host Python vs device ops), on the benchmark's Llama-3.2-1B checkpoint
timeout "${PROFILE_SECONDS:-60}" python3 benchmarks/profile_decode.py /tmp/bench-ckpt/llama3.2-1b-L16-v2 --device cuda \
    --tokens 64 --top 30 2>&1 | tee "$out/cuda-profile.log"
