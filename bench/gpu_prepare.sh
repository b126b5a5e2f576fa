#!/usr/bin/env bash
# Fill .device/ (git-ignored), what bench/gpu.sh needs on the GPU machine, where neither PyPI
# nor ../shared can be reached and TensorFlow is absent (`make gpu-bundle`; then carry
# .device in the device tool's run and call bench/gpu.sh):
#   .device/whl/           keras and the pure-Python or small dependencies that image lacks
#                          (cp312 wheels; numpy, h5py, rich, absl-py, ml-dtypes are there)
#   .device/native/        align/_native.c built for CPython 3.12 (a plain shared library)
#   .device/weights/       det1..3.npy (the machine cannot fetch them; ALIGN_WEIGHTS_DIR there)
#   .device/data/          ../shared/faces/lfw_gwb (gpu.sh copies it 4 times there) and dev
#   .device/cpu/           this machine's run on both (TensorFlow, the default backend):
#                          faces.jsonl and thumbnails, which gpu.sh compares with the GPU's
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared}
D=.device
KERAS=$($PY -c "import keras; print(keras.__version__)")
rm -rf $D && mkdir -p $D/whl $D/native $D/data $D/cpu $D/weights
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $D/whl \
    keras==$KERAS namex==0.1.0 optree==0.20.0
gcc -O2 -ffp-contract=off -shared -fPIC align/_native.c -o $D/native/_native.cpython-312-x86_64-linux-gnu.so
cp "$($PY -c 'from facenet_nets.weights import weights_dir; print(weights_dir())')"/det?.npy $D/weights/
cp -r $SHARED/faces/lfw_gwb $SHARED/faces/dev $D/data/
# the runs to compare with: as bench/bench.py runs lfw_gwb, and the default options on dev
$PY -m align $D/data/lfw_gwb $D/cpu/lfw_gwb --image_size 160 --margin 44 --quiet --no-report
$PY -m align $D/data/dev $D/cpu/dev --quiet --no-report
rm -rf $D/cpu/*/.align_dataset
# a fifth of lfw_gwb's thumbnails: what travels stays under the device tool's 64 MiB
ls $D/cpu/lfw_gwb/*/* | awk 'NR % 5' | xargs rm
du -sh $D
