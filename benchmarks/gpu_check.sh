#!/usr/bin/env bash
# The MI GPU check, one script for a lent GPU machine (about 5 minutes expected on one H100;
# each step has a time limit, 10 minutes at most in all):
#   1. the Triton / torch GPU kernels bit-identical to the numba CPU kernel (pytest -m gpu);
#   2. the GPU table: pairs/s of triton, triton-sort and the numba CPU kernel for 28x28 grey,
#      64x64 grey and 32x32x3 at 256 levels, ratios timed in the same process (mi_throughput.py);
#   3. a 60,000-image matrix of digits on this GPU through Ray into a float32 tile store
#      (mi_scale.py --gpu), with its ratio to the kernel alone timed in the same process.
# Run from the repository root:  bash benchmarks/gpu_check.sh   (outputs also go to $OUT if set)
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
start=$SECONDS
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, tee its output, note failures and keep going
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && { echo "=== $name FAILED (exit $rc)"; status=1; }
    return 0
}

hostname
nvidia-smi -L || true
# the package's dependencies (pip's local wheels on a machine without internet)
python -c "import drmi_ray.matrix, drmi_ray.mi, mlxtend, sklearn, pytest" 2>/dev/null || pip install -q -e ".[test]"
python -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, \
'numba', numba.__version__, 'cuda', torch.cuda.is_available())"

step exactness 180 python -m pytest -q -p no:cacheprovider -m gpu tests/test_mi.py -k gpu_kernel
step gpu_table 200 python benchmarks/mi_throughput.py --gpu --no-cpu-table --min-seconds 1 --warps 1 2 4 \
    --json "$out/mi_throughput_gpu.json"
step scale_60k 220 python benchmarks/mi_scale.py --gpu --sizes 60000 --dtype float32
ray stop --force >/dev/null 2>&1 || true  # the local Ray instance mi_scale.py started, if a time limit cut it
echo "=== done in $((SECONDS - start))s; logs in $out; $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED)"
exit $status
