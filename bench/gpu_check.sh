#!/usr/bin/env bash
# Check and time everything on a GPU machine without network access, in two commands.
#
# With network (once):  bash bench/gpu_check.sh fetch   # pure-Python wheels a bare CUDA image lacks -> .whl/
# On the GPU machine, in a copy of this checkout that includes .whl/:
#                       bash bench/gpu_check.sh tests   # every test with compiled kernels, ~5 min
#                       bash bench/gpu_check.sh bench   # the timed benchmark, ~8 min
# Logs, bench/results/*.json and RESULTS.md are written under $OUT (default /tmp/sparo-gpu-out):
# copy the JSON into bench/results/ of the development checkout and run `python bench/render.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-tests}"
OUT="${OUT:-/tmp/sparo-gpu-out}"
mkdir -p "$OUT"

if [ "$mode" = fetch ]; then
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  # The GPU image has torch, triton, pytest(-benchmark, -xdist), hypothesis, pillow, timm,
  # huggingface_hub, regex, tqdm; these are missing (pure-Python wheels).
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth
  exit $?
fi

# Packages: carried wheels, then this checkout under the installed import names.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/pkgs
ln -sfn "$PWD/kernels" /tmp/pkgs/sparo_fast_kernels
ln -sfn "$PWD/training" /tmp/pkgs/sparo_fast_training
export PYTHONPATH="$PWD:/tmp/pkgs:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1

case "$mode" in
  tests)
    # Every kernel test with real compiled kernels (bf16 included), then the rest of the suite.
    python3 -m pytest -q -ra tests/test_sparo_readout_triton.py tests/test_sparo_readout_compile.py 2>&1 | tee "$OUT/tests_triton.log"
    python3 -m pytest -q -ra -n 8 tests --benchmark-disable 2>&1 | tee "$OUT/tests_all.log"
    python3 -m pytest -q -ra bench --benchmark-disable 2>&1 | tee "$OUT/bench_smoke.log"
    ;;
  bench)
    python3 -m pytest bench -q -ra 2>&1 | tee "$OUT/bench.log"
    cp bench/results/*.json bench/RESULTS.md "$OUT/" 2>/dev/null
    ;;
  *) echo "usage: bench/gpu_check.sh fetch|tests|bench" >&2; exit 2 ;;
esac
