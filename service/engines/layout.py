"""How a model uses the CPU: ONNX Runtime threads per forward pass, passes at once, and which batches
may run beside a running one.

Two layouts, chosen per variant (measured on 2 cores with all-MiniLM-L6-v2, 32 single-text clients):

- Wide passes (float32, and every CUDA model): each pass uses every core, and a second pass may run
  beside it only when it is small (at most `SMALL_OVERLAP_TOKENS` padded tokens). A lone request gets
  all cores (fp32 batch-1: 2.9 ms on two threads, 4.2 ms on one); the small second pass keeps the
  cores busy when the event loop takes one of them, which stalls a wide pass at every operator.
- Narrow passes (int8 on CPU): half the cores per pass, two passes at once, any size. int8 batch-1 is
  no faster on two threads than on one (1.7 ms), and two single-threaded passes have no barriers to
  stall: 32 clients got 1,140 texts/s instead of 945, the lone client 3.1 ms instead of 3.4.

`--intra-op-threads` and `--engine-workers` override either choice; whenever passes x threads fit in
the cores, any batch may overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

# The largest batch (padded tokens) that may run beside another when passes x threads exceed the cores.
SMALL_OVERLAP_TOKENS = 256


@dataclass(frozen=True)
class ThreadLayout:
    intra_op_threads: int
    workers: int
    overlap_tokens: int | None  # None: a batch of any size may run beside another

    def describe(self) -> str:
        overlap = "any batch" if self.overlap_tokens is None else f"batches <= {self.overlap_tokens} tokens"
        return f"{self.workers} passes x {self.intra_op_threads} threads, overlapping {overlap}"


def thread_layout(variant: str, device: str, cores: int, intra_op_threads: int | None = None,
                  workers: int | None = None) -> ThreadLayout:
    """The layout for a model variant on `cores` cores; explicit settings win."""
    cores = max(1, cores)
    narrow = device == "cpu" and variant == "int8"
    threads = intra_op_threads or (max(1, cores // 2) if narrow else cores)
    passes = workers or min(2, cores)
    return ThreadLayout(threads, passes, SMALL_OVERLAP_TOKENS if threads * passes > cores else None)
