"""How a model uses the CPU: ONNX Runtime threads per forward pass, passes at once, and which batches
may run beside a running one.

Two layouts (measured on 2 cores with all-MiniLM-L6-v2):

- Narrow passes (every model on CPU): the cores shared among two passes that run at once, any size
  (on 2 cores: two single-threaded passes). Single-threaded passes have no barriers to stall when
  the event loop takes a core: int8, 32 clients got 1,140 texts/s instead of 945 with wide passes.
  fp32 passes were wide (two threads each, a second pass only when small) until the lone session
  below took over the lone request, which was what the width was for; in alternated runs narrow
  fp32 passes got 8 long-text clients 26.7-27.2 texts/s instead of 24.3-24.9, 32 single-text clients
  506 instead of 485, 8 x 32 texts 599 instead of 561, at a higher p99 for long texts (one long
  batch on one thread takes twice as long). int8 uses half the cores per pass on bigger machines too;
  fp32 divides them among the passes (`--engine-workers 1` gives one pass every core).
- Wide passes (every CUDA model, or CPU with `--intra-op-threads` = the cores): each pass uses every
  core, and a second pass may run beside it only when it is small (at most `SMALL_OVERLAP_TOKENS`
  padded tokens), which keeps the cores busy when the event loop takes one of them.

A lone batch (nothing else running or waiting) runs on a second session with every core whose threads
spin between operators (`lone_threads`), stopped the moment the pass ends, so an idle server burns
nothing and the sessions that serve concurrent load never spin. It widens the pass and adds the
spinning: int8 batch-1 on two spinning threads took 1.0-1.3 ms where one thread took 1.3-2.3 ms; fp32
batch-1 of ~13 tokens took 2.25-2.5 ms spinning on two threads against 2.9 ms not spinning and 4.2 ms
on one thread, and a lone fp32 client's p50 over HTTP went from 3.7 to 3.1 ms. It costs a second copy
of the weights (~90 MB for MiniLM fp32, ~60 MB int8). Where the main session spins already and is as
wide, there is no second one.

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
    passes = workers or min(2, cores)
    if device != "cpu":
        threads = cores
    elif variant == "int8":
        threads = max(1, cores // 2)
    else:  # float32: the cores are shared among the passes (one pass alone gets them all)
        threads = max(1, cores // passes)
    threads = intra_op_threads or threads
    adds_something = threads < cores or not spinning  # a wider pass, or spinning threads
    lone = cores if lone_pass and device == "cpu" and passes > 1 and adds_something else None
    return ThreadLayout(threads, passes, SMALL_OVERLAP_TOKENS if threads * passes > cores else None, lone)
