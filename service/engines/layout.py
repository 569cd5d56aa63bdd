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

A lone batch (nothing else running or waiting) runs on a second session with every core whose threads
spin between operators (`lone_threads`), stopped the moment the pass ends, so an idle server burns
nothing and the sessions that serve concurrent load never spin. With narrow passes (int8) it widens the
pass: int8 batch-1 on two spinning threads took 1.0-1.3 ms where one thread took 1.3-2.3 ms. With wide
passes (float32) it adds the spinning alone: fp32 batch-1 of ~13 tokens took 2.25-2.5 ms spinning against
2.9 ms not, and a lone client's p50 over HTTP went from 3.7 to 3.1 ms, for a second copy of the weights
(~90 MB for MiniLM fp32). Where the main session spins already and is as wide, there is no second one.

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
    lone_threads: int | None = None  # a lone batch runs on a second, spinning session this wide (None: no)

    def describe(self) -> str:
        overlap = "any batch" if self.overlap_tokens is None else f"batches <= {self.overlap_tokens} tokens"
        lone = f"; a lone batch on {self.lone_threads} spinning threads" if self.lone_threads else ""
        return f"{self.workers} passes x {self.intra_op_threads} threads, overlapping {overlap}{lone}"


def thread_layout(variant: str, device: str, cores: int, intra_op_threads: int | None = None,
                  workers: int | None = None, lone_pass: bool = True, spinning: bool = False) -> ThreadLayout:
    """The layout for a model variant on `cores` cores; explicit settings win. `spinning`: the main
    session's threads spin already (--allow-spinning, --spin-microseconds)."""
    cores = max(1, cores)
    narrow = device == "cpu" and variant == "int8"
    threads = intra_op_threads or (max(1, cores // 2) if narrow else cores)
    passes = workers or min(2, cores)
    adds_something = threads < cores or not spinning  # a wider pass, or spinning threads
    lone = cores if lone_pass and device == "cpu" and passes > 1 and adds_something else None
    return ThreadLayout(threads, passes, SMALL_OVERLAP_TOKENS if threads * passes > cores else None, lone)
