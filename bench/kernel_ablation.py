"""Where the attention pass's time goes: the decode op with parts of its kernel file cut out, in one process.

    python3 -P bench/kernel_ablation.py --preparation qwen3 --shapes 64x921 128x921

Each ablation is a set of exact source edits of ``kernels/decode_attention.py`` (each must match once,
or the script stops), loaded as a module of its own (`kernel_ab.load_baseline`) and timed beside the
unedited op and SDPA on the same inputs, interleaved round by round, GPU time per step in a CUDA graph,
medians over the rounds. Most ablations compute something else than the op (they drop work to see
what it costs) and are timed only; those marked ``exact`` are candidate changes, checked first to give
the op's output bit for bit and its next write slots.
"""

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script with -P too, like the other benches
from longflow_patch.kernels import decode_attention as current

import common
from common import environment, print_table, write_results
from decode_op import SETTINGS, make_inputs, sdpa_call
from kernel_ab import interleaved_graph_us, load_baseline, same_step, step_call

KERNEL_FILE = Path(current.__file__)

_TILE_LOGIT_STORE = """\
        tl.store(logit_base + offs_g[:, None] * logit_stride + offs_s[None, :], qk.to(Logits.dtype.element_ty),
                 mask=g_mask[:, None] & in_range[None, :], eviction_policy="evict_last")  # fmt: skip
"""
_POSITION_LOAD = "pos = tl.load(pos_base + offs_s, mask=in_range, other=-1)"
_IN_RANGE = "in_range = (offs_s < end) & (offs_s != write_slot)"
_SCORE_LAUNCH = "    step.score_merge("
_OWNER_LOGIT_STORE = (
    "    tl.store(logit_base + offs_g * logit_stride + write_slot, qk_new.to(Logits.dtype.element_ty), "
    "mask=g_mask & owns)"
)
_LOGIT_STRIDE = "return self.score_block * math.ceil(self.slots / self.score_block)"
_LOGITS_SCRATCH = (
    "logits=torch.empty((batch, kv_heads, group, plan.logit_stride), dtype=STORED_LOGIT_DTYPE, device=device),"
)
_KV_LOADS = (
    "k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=in_range[:, None], other=0.0)",
    "v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=in_range[:, None], other=0.0)",
)


@dataclass(frozen=True)
class Ablation:
    """Source edits (``old``, ``new``) of the kernel file; ``exact``: the result must stay the op's."""

    edits: tuple[tuple[str, str], ...]
    exact: bool = False


NO_LOGIT_STORE = ((_TILE_LOGIT_STORE, ""),)
NO_POSITION_LOAD = ((_POSITION_LOAD, "pos = offs_s"),)
NO_WRITE_SLOT_MASK = ((_IN_RANGE, "in_range = offs_s < end"),)
NO_SCORING_PASS = ((_SCORE_LAUNCH, "    (lambda *args, **kwargs: None)("),)
# L2 policy: K/V are read once a step, the logits are read back by the scoring pass right after (the
# kernel stores them evict-last since the thirteenth run; the ablation drops the hint).
KV_EVICT_FIRST = tuple((load, load[:-1] + ', eviction_policy="evict_first")') for load in _KV_LOADS)
NO_LOGITS_EVICT_LAST = ((_TILE_LOGIT_STORE, _TILE_LOGIT_STORE.replace(', eviction_policy="evict_last"', "")),)
ABLATIONS = {
    "no-logit-store": Ablation(NO_LOGIT_STORE),
    "no-position-load": Ablation(NO_POSITION_LOAD),
    "no-write-slot-mask": Ablation(NO_WRITE_SLOT_MASK),
    # The slot loop as plain attention: K/V tiles, softmax, nothing else.
    "bare-loop": Ablation(NO_LOGIT_STORE + NO_POSITION_LOAD + NO_WRITE_SLOT_MASK),
    "attention-pass-only": Ablation(NO_SCORING_PASS),
    "bare-attention-pass": Ablation(NO_LOGIT_STORE + NO_POSITION_LOAD + NO_WRITE_SLOT_MASK + NO_SCORING_PASS),
    # L2 eviction hints (the same values, so exact): the logits' dropped, or K/V's added.
    "no-logits-evict-last": Ablation(NO_LOGITS_EVICT_LAST, exact=True),
    "kv-evict-first": Ablation(KV_EVICT_FIRST, exact=True),
    # The logits' round trip (stored by the attention pass, read by the scoring pass) in float32, as
    # until 2026-12-07: twice the bytes of the kernel's fp16. Timed only: the output is the
    # op's, but the scores do not round as the reference's, so a choice between near-equal slots may change.
    "logits-fp32": Ablation(((_LOGITS_SCRATCH, _LOGITS_SCRATCH.replace("STORED_LOGIT_DTYPE", "torch.float32")),)),
    # A candidate: the tile's logits stored under the query-head mask alone (the slot mask is
    # constant over a thread's adjacent columns, so they may go as one vector store). Slots out of
    # range get -inf (the scoring pass masks them), the write slot's is overwritten by its owner after
    # a barrier, and rows are padded to whole attention tiles so the last tile stays in its row.
    "row-mask-logit-store": Ablation(
        (
            (_TILE_LOGIT_STORE, _TILE_LOGIT_STORE.replace("g_mask[:, None] & in_range[None, :]", "g_mask[:, None]")),
            (_OWNER_LOGIT_STORE, "    tl.debug_barrier()\n" + _OWNER_LOGIT_STORE),
            (
                _LOGIT_STRIDE,
                "block = max(self.score_block, self.block_s)\n        return block * math.ceil(self.slots / block)",
            ),
        ),
        exact=True,
    ),
}


def edited_source(ablation: Ablation, source: str) -> str:
    """``source`` with ``ablation``'s edits; an edit that does not match exactly once is an error."""
    for old, new in ablation.edits:
        if source.count(old) != 1:
            raise ValueError(f"kernel_ablation: {old.strip()[:60]!r} matches {source.count(old)} times, not once")
        source = source.replace(old, new)
    return source


def load_ablation(name: str, folder: Path) -> object:
    """The kernel file with ablation ``name`` applied, as a module."""
    path = folder / f"decode_attention_{name.replace('-', '_')}.py"
    path.write_text(edited_source(ABLATIONS[name], KERNEL_FILE.read_text()))
    return load_baseline(path, f"longflow_patch.kernels.ablation_{name.replace('-', '_')}")


def graph_row(modules: dict, batch: int, slots: int, rounds: int, preparation: str) -> dict:
    inputs = make_inputs(batch, slots, preparation=preparation)
    calls = {name: step_call(module, inputs, None) for name, module in modules.items()}
    calls["sdpa"] = sdpa_call(inputs)
    row = {"batch": batch, "slots": slots, **interleaved_graph_us(calls, rounds)}
    for name in calls:
        row[f"{name}/op"] = row[f"{name}_us"] / row["op_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablations", nargs="+", choices=sorted(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument("--shapes", nargs="+", metavar="BATCHxSLOTS", default=["64x921", "128x921", "64x1740"])
    parser.add_argument("--preparation", choices=["none", "rope", "qwen3"], default="qwen3")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernel_ablation.json"))
    args = common.parse_args_on_gpu(parser)
    import longflow_patch  # noqa: F401  (registers the op)

    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes]
    with tempfile.TemporaryDirectory() as folder:
        modules = {"op": current, **{name: load_ablation(name, Path(folder)) for name in args.ablations}}
        bit_equal = {
            name: {f"{b}x{s}": same_step(modules[name], b, s, args.preparation) for b, s in shapes}
            for name in args.ablations
            if ABLATIONS[name].exact
        }
        print(f"exact ablations, outputs equal bit for bit: {bit_equal}")
        rows = [graph_row(modules, batch, slots, args.rounds, args.preparation) for batch, slots in shapes]
    print(f"\nGPU time per step in a CUDA graph, us (preparation {args.preparation}; medians of {args.rounds} rounds)")
    names = [*modules, "sdpa"]
    print_table(rows, ["batch", "slots", *(f"{name}_us" for name in names)])
    print()
    print_table(rows, ["batch", "slots", *(f"{name}/op" for name in names[1:])])
    write_results(args.out, {"benchmark": "kernel_ablation", "environment": environment(), "settings": SETTINGS,
                             "preparation": args.preparation, "rounds": args.rounds,
                             "ablations": {name: [list(edit) for edit in ABLATIONS[name].edits]
                                           for name in args.ablations},
                             "exact_bit_equal": bit_equal, "graph": rows})  # fmt: skip


if __name__ == "__main__":
    main()
