"""A decode step's scoring pass beside the model's next kernels, on a second CUDA stream.

The scoring pass only chooses the layer's next write slot, which nothing reads before the same
layer's next step. On the model's stream it still sits between the attention pass and the output
projection: the layer's ``o_proj``, its MLP and the next layer's projections wait for about 10 µs of
latency-bound work (a chain of dependent loads and two atomics) per layer at batch 64. `beside`
runs it on a side stream instead, forked from the model's stream after the attention pass, and the
next decode call of the same thread joins it (`join`) before it launches anything. So each read
and write of a layer's cache state keeps the order it has on one stream; only kernels that touch
none of it (the projections and MLPs in between) run beside the scoring pass. A caller that asks
for it must make another call before anything else reads the cache: `LongFlowCache` runs its last
layer's pass inline, so a step ends joined. A CUDA graph capture holds both streams, forked and
joined, and replays them so.

The side work holds its launch's scratch buffers (``keep``) until it is joined, so that the
allocator does not hand them to the kernels that run beside it. It reads no temporary tensor of the
caller's, whose memory a compiled graph may reuse at once: the scoring pass reads the step's position
from the cache, where the attention pass stored it.
"""

import functools
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

OVERLAP_SCORING = True
"""Whether calls that allow it run the scoring pass on the side stream (benchmarks switch it off)."""
SIDE_STREAM_PRIORITY = -1
"""CUDA priority of the side stream: above the model's (0, the default streams' and the lowest), so
that the scoring pass's blocks take SMs as the kernels beside it free them. A CUDA graph keeps each
kernel's priority from its capture. (Measured against 0: docs/results/kernels_throughput.md,
thirteenth run.)"""

_pending = threading.local()  # .work: (event recorded after the side work, what it keeps alive)


@functools.cache
def side_stream(device: int, priority: int) -> torch.cuda.Stream:
    """The side stream of CUDA device ``device`` at ``priority``, made once."""
    return torch.cuda.Stream(device=device, priority=priority)


def pending() -> bool:
    """Whether this thread's last decode call left side work that no call has joined yet."""
    return getattr(_pending, "work", None) is not None


def join() -> None:
    """Make the current stream wait for the side work of this thread's last call, if any, and let
    go of what it kept. Every decode call joins before it launches."""
    work = getattr(_pending, "work", None)
    if work is not None:
        torch.cuda.current_stream().wait_event(work[0])
        _pending.work = None  # the kept buffers are freed after the wait, in the current stream's order


_INLINE = nullcontext()  # `beside` when disabled: one shared object, no generator made per call


def beside(enabled: bool, keep: object) -> AbstractContextManager[torch.cuda.Stream | None]:
    """Launches in the block run on a side stream of the current device (where the decode kernels
    launch) after everything queued so far on the current stream, and stay pending until the next
    `join`, which also releases ``keep``. Yields the side stream, or None (``enabled`` false: the
    block runs where it is)."""
    return _on_side_stream(keep) if enabled else _INLINE


@contextmanager
def _on_side_stream(keep: object) -> Iterator[torch.cuda.Stream]:
    side = side_stream(torch.cuda.current_device(), SIDE_STREAM_PRIORITY)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield side
    _pending.work = (side.record_event(), keep)
