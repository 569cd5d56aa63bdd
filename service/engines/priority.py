"""Thread priorities: inference threads yield the CPU to the event loop.

On a machine with few cores, ONNX Runtime's threads and the event loop compete for the same CPUs.
When the event loop has work (parsing requests, answering /health, refusing a flood), it should get
the CPU at once; inference can use what is left. Linux keeps a nice value per thread, and threads
inherit the value of the thread that starts them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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
