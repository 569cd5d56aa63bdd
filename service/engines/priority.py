"""What an inference thread carries with it: its priority, and which of a model's sessions it runs on.

On a machine with few cores, ONNX Runtime's threads and the event loop compete for the same CPUs.
When the event loop has work (parsing requests, answering /health, refusing a flood), it should get
the CPU at once; inference can use what is left. Linux keeps a nice value per thread, and threads
inherit the value of the thread that starts them.

A model may hold one ONNX Runtime session per pass that runs at once (see service.engines.layout):
each batcher worker names its slot once (`set_pass_slot`), and the engine runs that worker's passes on
session `slot % sessions`. Any other thread (the event loop's inline passes, warm-up) is slot 0.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


_slot = threading.local()


def set_pass_slot(slot: int) -> None:
    """The calling thread's passes run on the model's session `slot` (modulo how many it has)."""
    _slot.value = slot


def pass_slot() -> int:
    """The calling thread's slot (0 unless `set_pass_slot` named one)."""
    return getattr(_slot, "value", 0)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux: nice is per thread). Threads it starts inherit it."""
    if nice > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):  # not permitted: run at the normal priority
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def with_nice(nice: int, create: Callable[[], T]) -> T:
    """Run `create` on a thread with the given nice value, so the thread pool ONNX Runtime starts for a
    session inherits it; nice 0 runs it right here."""
    if nice <= 0:
        return create()
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        lower_thread_priority(nice)
        try:
            result.append(create())
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=run, name="session-create")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
