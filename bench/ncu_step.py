"""One fused decode op call and SDPA's attention over the same cache (`decode_op.make_inputs`: the
8B attention shape, bf16, shared eviction), each called a few times, for Nsight Compute to profile:

    ncu --kernel-name regex:"attend_split|score_merge|sdpa" --launch-skip 6 --launch-count 3 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section LaunchStats --section SchedulerStats --section WarpStateStats \\
        python3 -P bench/ncu_step.py --batch 64 --slots 921

Four calls of each, the op's first; ``--launch-skip 6`` passes the op's first three calls (two
launches each) and profiles its fourth, then SDPA's first. It prints nothing: ncu's report is the
result (`bench/results/ncu_attend_sdpa_h100_b64_921.txt`).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also under python -P
import common
from decode_op import fused_call, make_inputs, sdpa_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--slots", type=int, default=921)
    parser.add_argument("--preparation", choices=["none", "rope", "qwen3"], default="qwen3",
                        help="what the op does to the new token first (`decode_op.py --preparation`)")  # fmt: skip
    args = common.parse_args_on_gpu(parser)
    import longflow_patch  # noqa: F401  (registers the op)

    inputs = make_inputs(args.batch, args.slots, preparation=args.preparation)
    for call in (fused_call(inputs), sdpa_call(inputs)):
        for _ in range(4):
            call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
