#!/usr/bin/env bash
# The GPU runs the docs cite, one part per call, each meant to fit one 10-minute call (rows are written as they finish):
#   bash bench/gpu_figures.sh tests OUT        # the GPU test files (.ci/gpu_tests.sh), under the installed
#                                              # transformers and, where .whl/ holds its wheels, the newest one
#   bash bench/gpu_figures.sh kernel-tests OUT # the GPU test files that run the decode kernel (kernel against
#                                              # reference, eager path, op, compile), before timing a change
#   bash bench/gpu_figures.sh speed OUT        # bench/speed_suite.py: eager call cost (JIT and direct
#                                              # launches), throughput against the strongest full cache (and
#                                              # compiled LongFlow with generate's per-step stop check), profiles
#   bash bench/gpu_figures.sh speed-dynamic OUT  # compiled LongFlow as apply compiled it before (dynamic shapes
#                                              # from the second shape on), the order that idled on the H100
#   bash bench/gpu_figures.sh speed-loop OUT   # compiled LongFlow through generate beside the same step in the
#                                              # bare compiled loop
#   bash bench/gpu_figures.sh speed-1.7b OUT   # the speed suite on the Qwen3-1.7B shape
#   bash bench/gpu_figures.sh roofline-batches OUT  # compiled LongFlow (8B shape) at batch 64 and 128, each
#                                              # step against its own roofline (the issue's "batch >= 64"),
#                                              # the profiles of the 8k and 4k steps at batch 64, the 8k step
#                                              # through generate beside the bare compiled loop
#   bash bench/gpu_figures.sh prepared-ab OUT  # compiled LongFlow (8B shape, b64 4k/8k, b128 4k) with the new
#                                              # token's q/k norms and RoPE in the fused op and apart, side by
#                                              # side, and the 4k step's profile
#   bash bench/gpu_figures.sh fused-qkv OUT    # the fused q/k/v projection's GPU tests, then compiled LongFlow
#                                              # (8B shape, batch 64, 8k and 4k) with it and with the three
#                                              # projections apart, side by side, and bench/decoder_gemms.py
#   bash bench/gpu_figures.sh score-sweep OUT  # bench/decode_op.py at batch 64 and 171 (8B throughput rows),
#                                              # budgets on and off multiples of 16: per-kernel times and
#                                              # the scoring pass's launch shapes
#   bash bench/gpu_figures.sh attend-sweep OUT # bench/decode_op.py --sweep at the 8B throughput rows' shapes
#                                              # (batch 64-256, 921 and 1,740 slots): the attention pass's
#                                              # launch shapes against the default (swept so far at other shapes)
#   bash bench/gpu_figures.sh kernel-ab OUT    # bench/kernel_ab.py: the decode op against an earlier kernel
#                                              # file, put first at bench/baseline/decode_attention.py (ignored by
#                                              # git; carry it), e.g. from 5715db2, the last with three launches:
#                                              #   mkdir -p bench/baseline && git show \
#                                              #     5715db2:kernels/decode_attention.py > bench/baseline/decode_attention.py
#                                              # or against a whole earlier kernels/ folder (launch helpers too):
#                                              #   git archive REV kernels | tar -x -C bench/baseline
#   bash bench/gpu_figures.sh attend-ablation OUT  # bench/kernel_ablation.py: the op with parts of its kernel cut
#                                              # out, and candidates, at the 8B rows of 4k (batch 64, 128) and 8k
#   bash bench/gpu_figures.sh scoring-beside OUT  # compiled LongFlow (8B shape, 4k and 8k, batch 64 and 128)
#                                              # with the scoring pass beside the next kernels (apply's
#                                              # default) and on the model's stream, side by side
#   bash bench/gpu_figures.sh logits-fp32 OUT  # compiled LongFlow (8B shape, 4k batch 64 and 128, 8k batch 64) with
#                                              # the logits between the op's two passes in fp16 (the default) and
#                                              # in float32 (until 2026-12-07), side by side
#   bash bench/gpu_figures.sh gate-up OUT      # the GPU tests that patch whole models (fused projections, compile,
#                                              # model against transformers), bench/decoder_gemms.py at batch 64-256
#                                              # (both floors), then compiled LongFlow (8B shape, 4k
#                                              # at batch 64 and 128, 8k at batch 64) with the MLP's gate and up
#                                              # as one matmul (the default) and as two, side by side
#   bash bench/gpu_figures.sh speculative OUT  # recipes/bench_speculative.py: the toy's tokens/s per draft at 8k
#   bash bench/gpu_figures.sh speculative-2k OUT  # the same at 2k (speculative-4k: at 4k)
# OUT gets the results and logs (bench/results/ to commit them). The package is used from this checkout
# (PYTHONPATH, python3 -P), as on a machine where it is not installed.
#
# The newest transformers for the tests: its wheels and those of the packages it needs beyond the
# machine's (torch 2.11 image, transformers 5.17), downloaded beforehand, are installed into a
# separate folder put first on PYTHONPATH. For transformers 5.25:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl \
#       transformers==5.25.0 kernels==0.19.1 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 \
#       truststore tomlkit click anyio idna h11 typing_extensions
# (hf-xet, which only downloads use, is left out: with it the tree passes the device's 64 MiB limit.)
set -uo pipefail
cd "$(dirname "$0")/.."
part=$1
out=$2
mkdir -p "$out"
export PYTHONPATH=$PWD
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 6)

# beside_default SUFFIX CONFIG "OUTPUT BATCH"...: compiled LongFlow (8B shape, 96 steps a call) as
# apply's default and as CONFIG, side by side, one process per shape (it compiles once, about 50 s,
# then each row takes about 20 s): throughput_qwen3-8b_bBATCH_OUTPUT_SUFFIX.json and .log.
beside_default() {
    local suffix=$1 config=$2 shape output batch name
    shift 2
    for shape in "$@"; do
        read -r output batch <<<"$shape"
        name=throughput_qwen3-8b_b${batch}_${output}_${suffix}
        timeout 140 python3 -P recipes/bench_throughput.py --configs longflow-compiled "$config" \
            --max-batch "$batch" --outputs "$output" --steps 96 --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
    done
}

case $part in
tests)
    bash .ci/gpu_tests.sh "$out/gpu_tests_installed.log" "${parallel[@]}" &
    if compgen -G ".whl/transformers-*.whl" >/dev/null; then
        python3 -m pip install -q --no-deps --target /tmp/newest_transformers .whl/*.whl
        PYTHONPATH=/tmp/newest_transformers python3 -c "import transformers, kernels, huggingface_hub.file_download"
        PYTHONPATH=/tmp/newest_transformers:$PWD bash .ci/gpu_tests.sh "$out/gpu_tests_newest.log" "${parallel[@]}" &
    fi
    wait
    ;;
kernel-tests)
    GPU_TEST_FILES="tests/test_decode_kernel.py tests/test_eager_path.py tests/test_op.py tests/test_compile.py tests/test_fused_projections.py tests/test_new_token_preparation.py tests/test_side_stream.py" \
        bash .ci/gpu_tests.sh "$out/gpu_tests_kernel.log" "${parallel[@]}"
    ;;
speed)
    python3 -P bench/speed_suite.py --budget-s 570 --configs fullcache-loop longflow-compiled longflow-compiled-sync \
        longflow default \
        --out-dir "$out" 2>&1 | tee "$out/speed_suite.log"
    ;;
speed-dynamic)
    mkdir -p "$out/dynamic"
    python3 -P bench/speed_suite.py --budget-s 330 --outputs 8192 16384 --configs longflow-compiled \
        --compile-shapes dynamic --profile-outputs 16384 --eager-slots 1024 --out-dir "$out/dynamic" 2>&1 |
        tee "$out/dynamic/speed_suite.log"
    ;;
speed-loop)
    mkdir -p "$out/loop"
    python3 -P bench/speed_suite.py --budget-s 540 --outputs 8192 32768 16384 --configs longflow-compiled longflow-loop \
        --profile-outputs 8192 16384 --out-dir "$out/loop" 2>&1 | tee "$out/loop/speed_suite.log"
    ;;
speed-1.7b)
    python3 -P bench/speed_suite.py --budget-s 540 --shape qwen3-1.7b --configs fullcache-loop longflow-compiled longflow default \
        --out-dir "$out" 2>&1 | tee "$out/speed_suite_1.7b.log"
    ;;
roofline-batches)
    # At 16k the largest batch under 70 GB is 95, already measured by the speed part: 128 skips it.
    for batch_outputs in "64 8192 16384 4096" "128 8192 4096"; do
        set -- $batch_outputs
        batch=$1
        shift
        python3 -P recipes/bench_throughput.py --configs longflow-compiled --max-batch "$batch" --outputs "$@" \
            --steps 96 --out "$out/throughput_qwen3-8b_b$batch.json" 2>&1 | tee "$out/roofline_b$batch.log"
    done
    python3 -P bench/profile_step.py --shape qwen3-8b --batch 64 --budget 1740 \
        --out "$out/profile_step_qwen3-8b_b64.json" 2>&1 | tee "$out/profile_b64.log"
    python3 -P bench/profile_step.py --shape qwen3-8b --batch 64 --budget 921 \
        --out "$out/profile_step_qwen3-8b_b64_4k.json" 2>&1 | tee "$out/profile_b64_4k.log"
    # The same 8k step at batch 64 through generate and in the bare compiled loop, side by side:
    # whether the GPU idle the profile shows there is generate's host work.
    python3 -P recipes/bench_throughput.py --configs longflow-compiled longflow-loop --max-batch 64 --outputs 8192 \
        --steps 96 --out "$out/throughput_qwen3-8b_b64_loop.json" 2>&1 | tee "$out/roofline_b64_loop.log"
    ;;
attend-ablation)
    python3 -P bench/kernel_ablation.py --preparation qwen3 --shapes 64x921 128x921 64x1740 --rounds 3 \
        --out "$out/kernel_ablation_qwen3.json" 2>&1 | tee "$out/kernel_ablation_qwen3.log"
    ;;
scoring-beside)
    # Compiled LongFlow with each layer's scoring pass beside the next kernels (apply's default) and on
    # the model's stream (8B shape; 4k and 8k, batch 64 and 128).
    beside_default scoring_beside longflow-compiled-serial-scoring "4096 64" "4096 128" "8192 64" "8192 128"
    ;;
logits-fp32)
    beside_default logits_fp32 longflow-compiled-logits-fp32 "4096 64" "4096 128" "8192 64"
    ;;
gate-up)
    GPU_TEST_FILES="tests/test_fused_projections.py tests/test_gpu.py tests/test_compile.py" \
        bash .ci/gpu_tests.sh "$out/gpu_tests_gate_up.log" "${parallel[@]}"
    timeout 90 python3 -P bench/decoder_gemms.py --batches 64 128 171 256 --out "$out/decoder_gemms.json" 2>&1 |
        tee "$out/decoder_gemms.log"
    beside_default gate_up_apart longflow-compiled-gate-up-apart "4096 64" "4096 128" "8192 64"
    ;;
prepared-ab)
    # Compiled LongFlow (8B shape, batch 64 at 4k and 8k, batch 128 at 4k) with the new token's q/k norms
    # and RoPE inside the fused op (the default) and run by transformers' modules, side by side; the 4k
    # step's profile at batch 64.
    python3 -P recipes/bench_throughput.py --configs longflow-compiled longflow-compiled-prepared-apart --max-batch 64 \
        --outputs 4096 8192 --steps 96 --out "$out/throughput_qwen3-8b_b64_prepared.json" 2>&1 |
        tee "$out/prepared_b64.log"
    python3 -P recipes/bench_throughput.py --configs longflow-compiled longflow-compiled-prepared-apart --max-batch 128 \
        --outputs 4096 --steps 96 --out "$out/throughput_qwen3-8b_b128_prepared.json" 2>&1 | tee "$out/prepared_b128.log"
    python3 -P bench/profile_step.py --shape qwen3-8b --batch 64 --budget 921 \
        --out "$out/profile_step_qwen3-8b_b64_4k.json" 2>&1 | tee "$out/profile_b64_4k.log"
    ;;
fused-qkv)
    GPU_TEST_FILES="tests/test_fused_projections.py" bash .ci/gpu_tests.sh "$out/gpu_tests_fused_projections.log"
    python3 -P recipes/bench_throughput.py --configs longflow-compiled longflow-compiled-unfused --max-batch 64 \
        --outputs 8192 4096 --steps 96 --out "$out/throughput_qwen3-8b_b64_fused_qkv.json" 2>&1 |
        tee "$out/fused_qkv_b64.log"
    python3 -P bench/decoder_gemms.py --batches 64 128 256 --out "$out/decoder_gemms.json" 2>&1 | tee "$out/decoder_gemms.log"
    ;;
score-sweep)
    python3 -P bench/decode_op.py --batches 64 171 --slots 921 1024 1740 2048 3379 --score-sweep --profile \
        --out "$out/decode_op_score_sweep.json" 2>&1 | tee "$out/decode_op_score_sweep.log"
    ;;
attend-sweep)
    python3 -P bench/decode_op.py --batches 64 128 256 --slots 921 1740 --sweep \
        --out "$out/decode_op_attend_sweep.json" 2>&1 | tee "$out/decode_op_attend_sweep.log"
    ;;
kernel-ab)
    baseline=bench/baseline/decode_attention.py
    [ -d bench/baseline/kernels ] && baseline=bench/baseline/kernels
    [ -e $baseline ] || { echo "kernel-ab: no $baseline (see the top of this file)" >&2; exit 2; }
    python3 -P bench/kernel_ab.py --baseline $baseline --label "${AB_LABEL:-5715db2}" --out "$out/kernel_ab.json" 2>&1 |
        tee "$out/kernel_ab.log"
    ;;
speculative | speculative-2k | speculative-4k)
    context=${part#speculative}
    context=${context#-}
    context=${context:-8k}
    python3 -P recipes/bench_speculative.py --part toy --static --compile --drafts glide glide-tree self toy \
        --contexts $((${context%k} * 1024)) --new-tokens 512 --repeats 1 --out "$out/speculative_toy_$context.json" \
        2>&1 | tee "$out/speculative_toy_$context.log"
    ;;
*)
    echo "unknown part: $part (tests, kernel-tests, speed, speed-dynamic, speed-loop, speed-1.7b, roofline-batches," \
        "prepared-ab, fused-qkv, score-sweep, attend-sweep, kernel-ab, attend-ablation, scoring-beside, logits-fp32," \
        "gate-up, speculative, speculative-2k, speculative-4k)" >&2
    exit 2
    ;;
esac
