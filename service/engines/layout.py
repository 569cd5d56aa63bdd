"""How a model uses the CPU: ONNX Runtime threads per forward pass, passes at once, and which batches
may run beside a running one.

Two layouts:

- Narrow passes (every model on CPU): one single-threaded pass per core, any size. Measured on 2
  cores with all-MiniLM-L6-v2: single-threaded passes have no barriers to stall when the event loop
  takes a core: int8, 32 clients got 1,140 texts/s instead of 945 with wide passes. fp32 passes were
  wide (two threads each, a second pass only when small) until the lone session below took over the
  lone request, which was what the width was for; in alternated runs narrow fp32 passes got 8
  long-text clients 26.7-27.2 texts/s instead of 24.3-24.9, 32 single-text clients 506 instead of
  485, 8 x 32 texts 599 instead of 561, at a higher p99 for long texts (one long batch on one thread
  takes twice as long). On 16 cores of a Xeon (the GPU machine's host) the same holds: ONNX Runtime
  in-process ran batches of 32 at 5,915 int8 texts/s as 16 single-threaded passes against 1,880 as
  two 8-thread passes, and the server, which ran two 8-thread passes there before, got 8 clients x
  32 texts 5,964 int8 texts/s instead of 2,415-2,621 and 3,538 fp32 instead of 1,539-1,838; 32
  single-text int8 clients 1,788 instead of 1,472-1,486, fp32 1,332 against 1,197-1,535.
- Wide passes (every CUDA model, or CPU with `--intra-op-threads` = the cores): each pass uses every
  core, and a second pass may run beside it only when it is small (at most `SMALL_OVERLAP_TOKENS`
  padded tokens), which keeps the cores busy when the event loop takes one of them.

A lone batch (nothing else running or waiting) runs on a second session with every core whose threads
spin between operators (`lone_threads`), stopped the moment the pass ends, so an idle server burns
nothing and the sessions that serve concurrent load never spin. It widens the pass and adds the
spinning: int8 batch-1 on two spinning threads took 1.0-1.3 ms where one thread took 1.3-2.3 ms; fp32
batch-1 of ~13 tokens took 2.25-2.5 ms spinning on two threads against 2.9 ms not spinning and 4.2 ms
on one, and a lone fp32 client's p50 over HTTP went from 3.7 to 3.1 ms. It costs a second copy
of the weights (~90 MB for MiniLM fp32, ~60 MB int8). Where the main session spins already and is as
wide, there is no second one.

Passes that run at once share one ONNX Runtime session, except int8 passes on CPU: each gets a session
of its own (`sessions`), with its own copy of the weights and its own arena. Measured on 2 cores (the
AMD EPYC with AVX-512 VNNI of the README, `loadtests.interleave` against one shared session, int8, six
rounds): rerank of 20 pairs 1.09x (6 of 6), 8 clients x 32 texts 1.07x (5 of 6), 8 clients x one
256-token text 1.11x (6 of 6), 32 single-text clients 0.99x (level); float32 8 x 32 texts
1.00x and fp32 rerank 1.03x (4 of 6, a later day), and there a second copy of the weights is 90 MB,
so float32 passes keep sharing one. On the 2-core Xeon with AVX-512 VNNI and AMX the int8 gain was
smaller and long texts lost: rerank 1.03x, 8 x 32 texts 1.01x, 32 single-text clients 1.02x (5 of 6
each), 8 x one 256-token text 0.96x (0 of 6); the default follows the larger gains, and
`--engine-sessions 1` keeps one shared session.

float32 passes that share a session run it without ONNX Runtime's CPU arena (`ThreadLayout.arena`), each
buffer from the C library's heap of the thread that runs the pass, not from blocks the other pass (and
core) may have used last; why one shared arena costs small passes is not established, and its cost
moved from run to run (in-process, a packed graph on a shared session ran 535-636 texts/s with it,
574-654 without). Measured on the 2-core Zen 4 EPYC (2026-12-07,
`loadtests.interleave`, six rounds of 8 s), fp32 MiniLM with packed tokens (the default export), 32
single-text clients 1.065x without the arena (ahead in 5 of 6); against the padded graph with the arena
(the code and export before), 32 single-text clients 1.045x (5 of 6), 8 x 32 texts 1.016x (3 of 6), 32
clients of 5-250 words 1.112x (6 of 6), one client 0.987x (3 of 6), 8 clients of 256-token texts
0.967x-0.981x (1 and 0 of 6), rerank of 20 pairs 1.008x (3 of 6). int8 passes keep their arenas on a
shared session too (`--engine-sessions 1`): there 10-pair rerank batches ran 0.90x without it.

`--intra-op-threads` and `--engine-workers` override either choice (with `--engine-workers` alone,
int8 passes keep half the cores and fp32 passes share them); whenever passes x threads fit in the
cores, any batch may overlap.
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
    sessions: int = 1  # main sessions; worker i runs its passes on session i % sessions
    arena: bool = True  # the main sessions keep ONNX Runtime's CPU arena (float32 passes sharing one do not)

    def describe(self) -> str:
        overlap = "any batch" if self.overlap_tokens is None else f"batches <= {self.overlap_tokens} tokens"
        lone = f"; a lone batch on {self.lone_threads} spinning threads" if self.lone_threads else ""
        sessions = f" on {self.sessions} sessions" if self.sessions > 1 else ""
        arena = "" if self.arena else " without the CPU arena"
        return (f"{self.workers} passes x {self.intra_op_threads} threads{sessions}{arena}, "
                f"overlapping {overlap}{lone}")


def thread_layout(variant: str, device: str, cores: int, intra_op_threads: int | None = None,
                  workers: int | None = None, lone_pass: bool = True, spinning: bool = False,
                  sessions: int | None = None) -> ThreadLayout:
    """The layout for a model variant on `cores` cores; explicit settings win. `spinning`: the main
    session's threads spin already (--allow-spinning, --spin-microseconds); `sessions`: --engine-sessions
    (never more than the passes)."""
    cores = max(1, cores)
    if device != "cpu":
        passes, threads = workers or min(2, cores), cores
    elif workers is None:  # one single-threaded pass per core (or as many as --intra-op-threads fits, 2 at least)
        threads = intra_op_threads or 1
        passes = max(min(2, cores), cores // threads)
    elif variant == "int8":
        passes, threads = workers, max(1, cores // 2)
    else:  # float32: the cores are shared among the passes (one pass alone gets them all)
        passes, threads = workers, max(1, cores // workers)
    threads = intra_op_threads or threads
    adds_something = threads < cores or not spinning  # a wider pass, or spinning threads
    lone = cores if lone_pass and device == "cpu" and passes > 1 and adds_something else None
    if device != "cpu":
        sessions = 1
    elif sessions is None:
        sessions = passes if variant == "int8" else 1
    sessions = max(1, min(sessions, passes))
    # float32 passes that share a session go without its arena; int8 keeps it even there (on one shared
    # session, 10-pair rerank batches ran 0.90x without it).
    arena = not (device == "cpu" and variant == "float32" and sessions < passes)
    return ThreadLayout(threads, passes, SMALL_OVERLAP_TOKENS if threads * passes > cores else None, lone,
                        sessions, arena)
