#!/usr/bin/env bash
# The GPU test files on a CUDA machine (CI has no GPU; run by hand on one), logged with the versions
# they ran under:  bash .ci/gpu_tests.sh LOG [pytest args...]
# Run it once per transformers release to check (for another release, put its wheels first on
# PYTHONPATH). The files are those with CUDA cases (kernels on the GPU, compile, CUDA graphs,
# speculative rounds, inductor's code for cache writes) plus the allocated policies; the other files
# build CPU tensors only, so on a GPU machine they repeat what CI runs. Each test's result is logged
# as it ends (-v), so a run cut short still shows which passed. Exits with pytest's status.
# GPU_TEST_FILES (space-separated) runs only those files instead.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$1
shift
{
    python3 -c 'import sys, torch, transformers, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| triton", triton.__version__, "|", torch.cuda.get_device_name())'
    # shellcheck disable=SC2086  # a list of paths
    python3 -m pytest -v --durations=25 -p no:cacheprovider "$@" ${GPU_TEST_FILES:-tests/test_gpu.py \
        tests/test_speculative_gpu.py tests/test_compile.py tests/test_eager_path.py tests/test_decode_kernel.py \
        tests/test_verify_attention.py tests/test_op.py tests/test_allocated_policies.py tests/test_compiled_cache_writes.py \
        tests/test_fused_projections.py tests/test_new_token_preparation.py tests/test_side_stream.py}
} 2>&1 | tee "$log"
