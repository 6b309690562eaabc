#!/usr/bin/env bash
# GPU check of the kern branch: kernel tests (real compiled kernels, autotuning, bf16) and timings.
set -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kout}; mkdir -p $OUT
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee $OUT/env.txt
mk() { rm -rf /tmp/p_$1; mkdir -p /tmp/p_$1; ln -sfn $2/kernels /tmp/p_$1/sparo_fast_kernels; ln -sfn $2/sparo_fast /tmp/p_$1/sparo_fast; }
mk new $HERE/tree; mk old $ROOT
cd $HERE/tree
PYTHONPATH=/tmp/p_new timeout ${TEST_T:-330} python3 -m pytest -q -x -ra tests/test_triton_backend.py -p no:cacheprovider 2>&1 | tee $OUT/tests.log | tail -25
PYTHONPATH=/tmp/p_new timeout 150 python3 $HERE/time_readout.py new 2>&1 | tee $OUT/time_new.log | grep -v Warn
PYTHONPATH=/tmp/p_old timeout 90 python3 $HERE/time_readout.py old 2>&1 | tee $OUT/time_old.log | grep -v Warn
