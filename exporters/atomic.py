"""Build a directory beside its final place and swap it in atomically, under a lock."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from exporters.errors import ExportFailure, ExportInputError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for folder in [directory, *[p for p in directory.rglob("*") if p.is_dir()]]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False where the kernel lacks it."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(second))


def check_output_dir(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportInputError(f"cannot create output directory {output}: {error.strerror}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ExportInputError(f"output directory {output} is not writable")
    try:
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as error:
        raise ExportInputError(f"output directory {output} is not writable: {error.strerror}") from None


def _remove_stale_partials(output: Path, name: str) -> None:
    """Remove partial builds of NAME left by exports that were killed (their process is gone)."""
    for partial in output.glob(f".{name}.partial-*"):
        try:
            pid = int(partial.name.rsplit("-", 2)[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            continue


@contextlib.contextmanager
def staged_directory(output: Path, name: str) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit it replaces output/name, on error it vanishes.

    A process killed mid-build leaves only a hidden `.NAME.partial-PID-*` directory, which the next
    export of NAME removes; the existing bundle is never touched until the new one is complete.
    """
    check_output_dir(output)
    lock_path = output / f".{name}.lock"
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportFailure(f"another export of {name} into {output} is running") from None
        _remove_stale_partials(output, name)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=output))
        # mkdtemp makes the directory private (0700); a bundle must be readable by the server's user,
        # e.g. a container's non-root user reading a bundle exported as root.
        os.chmod(staging, 0o755)
        try:
            yield staging
            _fsync_tree(staging)
            final = output / name
            if final.exists() and _exchange(staging, final):
                shutil.rmtree(staging)  # now holds the previous bundle
            else:
                if final.exists():
                    retired = output / f".{name}.retired-{os.getpid()}"
                    os.rename(final, retired)
                    try:
                        os.rename(staging, final)
                    except OSError:
                        os.rename(retired, final)
                        raise
                    shutil.rmtree(retired, ignore_errors=True)
                else:
                    os.rename(staging, final)
            fd = os.open(output, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
