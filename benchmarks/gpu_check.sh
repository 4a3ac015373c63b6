#!/usr/bin/env bash
# One short device run for the fast path (issue 9), on a CUDA machine with torch but without diffusers:
#   1. the UNet step of txt2img-f8-large at 256x256, batch 2: ldm vs diffusers in fp16, fp32 and bf16 (with
#      COMPILE=1 also torch.compile with frozen weights for bf16) (benchmarks/unet_step.py);
#   2. the fast-path correctness tests on CUDA (tests/test_fastpath.py, CPU and CUDA cases);
#   3. images per second at 256x256: 8 images, 20 DPM-Solver++ steps, bf16, decode included (txt2img_e2e.py).
# Wheels for what the machine lacks (diffusers, platformdirs) travel in .whl/; the BERT vocab is tests/fixtures'.
# Results land in $OUT (*.json, *.log). Each stage has its own time limit so one slow stage cannot eat the rest.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

echo "== 1. UNet step vs diffusers"
timeout "${UNET_LIMIT:-100}" python3 benchmarks/unet_step.py --device cuda --dtypes fp16,fp32,bf16 --repeats 20 --other-layout \
  ${COMPILE:+--compile --compile-dtypes bf16} --json "$OUT/unet_cuda.json" 2>&1 | tee "$OUT/unet_cuda.log"

echo "== 2. fast-path tests on CUDA"
timeout "${TEST_LIMIT:-45}" python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -m "not slow" 2>&1 \
  | tail -15 | tee "$OUT/tests_cuda.log"

echo "== 3. images/s end to end"
timeout "${E2E_LIMIT:-65}" python3 benchmarks/txt2img_e2e.py --device cuda --batch 8 --variants fast \
  --workdir /tmp/e2e --json "$OUT/e2e_cuda.json" 2>&1 | tee "$OUT/e2e_cuda.log"
echo "== done"
