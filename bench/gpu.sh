#!/usr/bin/env bash
# One call on the GPU machine (one NVIDIA GPU, many cores, Python 3.12 with PyTorch and JAX,
# no TensorFlow, no network), at most ~8 minutes:
#
#   here:   make gpu-bundle                       (fills .device/: bench/gpu_prepare.sh)
#   there:  bench/gpu.sh      with .device carried (BACKENDS="torch jax" for both; default torch)
#
# Installs keras from the carried wheels, copies lfw_gwb 4 times (2,120 photos in 4 identity
# folders) and takes the dev set (204 photos up to 4,600 px), and for each backend:
#   - end to end: align_dataset --device gpu (one process owns the GPU and runs the nets of
#     every worker; one worker per core), photos/s from its summary.json;
#   - detect-only: Detector.detect_batch over decoded photos, in one process (bench/gpu_check.py);
#   - the boxes and thumbnails against the development machine's CPU run (TensorFlow).
# Everything printed is also written under $OUT (when set) as gpu-*.json and gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
D=${BUNDLE:-.device}
OUT=${OUT:-/tmp/gpu-out}
W=${WORK:-/tmp/gpu-bench}
DEVICE=${DEVICE:-gpu}           # DEVICE=cpu BUNDLE=... PYTHON=.venv/bin/python: a dry run here
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
T0=$SECONDS
KERAS_BACKEND=torch $PYTHON -c "import keras" 2>/dev/null || $PYTHON -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 ALIGN_WEIGHTS_DIR=${ALIGN_WEIGHTS_DIR:-$PWD/$D/weights}
[ -e align/_native.cpython-312-x86_64-linux-gnu.so ] || cp $D/native/*.so align/ 2>/dev/null
$PYTHON -c "import align.native as n; print('C kernels:', 'yes' if n.LIB else 'no (numpy)')"
nvidia-smi -L 2>/dev/null; nproc
rm -rf "$W" && mkdir -p "$W/lfw4"
for i in 1 2 3 4; do cp -r $D/data/lfw_gwb/George_W_Bush "$W/lfw4/George_W_Bush_$i"; done
echo "setup: $((SECONDS - T0)) s"

for backend in ${BACKENDS:-torch}; do
    if [ $((SECONDS - T0)) -gt 240 ]; then echo "== $backend: skipped, to end within 8 minutes"; break; fi
    export KERAS_BACKEND=$backend
    echo "== $backend"
    for set in lfw4 dev; do
        if [ $set = lfw4 ]; then src=$W/lfw4; args="--image_size 160 --margin 44"; cpu=$D/cpu/lfw_gwb; by="--by-name"
        else src=$D/data/dev; args=""; cpu=$D/cpu/dev; by=""; fi
        t=$SECONDS
        timeout 150 $PYTHON -m align "$src" "$W/$backend-$set" --device $DEVICE $args --quiet --no-report ${ALIGN_ARGS:-}
        echo "$set end to end ($((SECONDS - t)) s with start): $($PYTHON -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['images'], 'photos,', s['workers'], 'workers,', s['images_per_s'], 'photos/s, backend', s['backend'])" "$W/$backend-$set/summary.json")"
        $PYTHON bench/gpu_check.py compare "$cpu" "$W/$backend-$set" $by --json "$OUT/gpu-$backend-$set-compare.json"
    done
    timeout 90 $PYTHON bench/gpu_check.py detect-only $D/data/lfw_gwb --device $DEVICE --json "$OUT/gpu-$backend-lfw-detect.json"
    [ $((SECONDS - T0)) -lt 300 ] && timeout 90 $PYTHON bench/gpu_check.py detect-only $D/data/dev --device $DEVICE --json "$OUT/gpu-$backend-dev-detect.json"
done
echo "total: $((SECONDS - T0)) s"
