#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU (the lent device, a Jetson, a GPU server):
#   bash bench/gpu.sh [MODELS] [OUT]
# 1. the GPU tests (native TensorRT, the ONNX Runtime CUDA/TensorRT providers; each skips, saying why, where its
#    runtime is missing); 2. DASR's graphs on CUDA against the official procedure (needs torch with CUDA);
# 3. serving throughput on the GPU providers that are installed, side by side with the CPU.
set -u
PYTHON=${PYTHON:-python}
MODELS=${1:-bench/out/models}
OUT=${2:-bench/out/gpu}
mkdir -p "$OUT"
status=0
$PYTHON -m pytest -q -rs -m gpu tests/test_engine_tensorrt.py 2>&1 | tee "$OUT/gpu-tests.txt" || status=1
$PYTHON bench/dasr_gpu.py --data ../shared/data/composite-dev --images 20 2>&1 | tee "$OUT/dasr_gpu.md" || status=1
configs=()
providers=$($PYTHON -c "import onnxruntime as o; print(' '.join(o.get_available_providers()))")
[[ $providers == *CUDAExecutionProvider* ]] && configs+=(--config "cuda=--device cuda")
[[ $providers == *TensorrtExecutionProvider* ]] &&
    configs+=(--config "tensorrt fp16=--device tensorrt --precision fp16 --engine-cache $OUT/engines")
$PYTHON -c "import tensorrt" 2>/dev/null &&
    configs+=(--config "tensorrt-native fp16=--device tensorrt-native --precision fp16 --engine-cache $OUT/plans")
if ((${#configs[@]})); then
    $PYTHON bench/serving.py --models "$MODELS" --images ../shared/data/holidays-dev/images --rounds 2 \
        --config "cpu=--device cpu" "${configs[@]}" --out "$OUT/serving.json" 2>&1 | tee "$OUT/serving.md" || status=1
else
    echo "no GPU provider in onnxruntime ($providers) and no tensorrt: serving on GPU not measured" | tee "$OUT/serving.md"
fi
exit $status
