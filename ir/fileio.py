"""Writing results so that a crash, a kill or a second writer never leaves half of them.

- :func:`write_atomic`: a file is written to a unique temporary name beside it and renamed over
  it, so readers see the old file or the new one, never a prefix.
- :func:`staged_dir`: a directory result is built in a staging directory beside the target and
  swapped in whole by :func:`replace_dir` (Linux ``renameat2(RENAME_EXCHANGE)``: one atomic
  step, so a SIGKILL at any moment leaves the target as it was or complete). Two writers into
  one target each swap in their own complete result; the last swap wins.
- :func:`sha256_file`: the content hash artifacts and caches record to detect altered files.

Staging directories of processes that were killed (``.NAME.tmp-PID`` whose PID is gone) are
removed the next time the same target is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import tempfile

__all__ = ["write_atomic", "replace_dir", "staged_dir", "sha256_file", "sha256_bytes"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temporary file beside it and a rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_libc = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths; False when the kernel or libc cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018 - glibc >= 2.28
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(stage: str, out: str) -> None:
    """Put the complete directory ``stage`` at ``out`` in one atomic step; the previous ``out``
    (if any) is deleted afterwards. Safe against a concurrent writer doing the same."""
    for _ in range(100):
        if os.path.isdir(out):
            try:
                swapped = _exchange(stage, out)
            except FileNotFoundError:  # out vanished in between: rename below
                continue
            if swapped:
                shutil.rmtree(stage, ignore_errors=True)  # now holds the previous out
                return
            # no RENAME_EXCHANGE: the two-step swap (a kill in between leaves out missing)
            old = f"{stage}.old"
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(stage, out)
            return
        except OSError as e:  # another writer created out in between: swap instead
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(errno.EBUSY, "could not swap the output directory in", out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_stages(parent: str, base: str) -> None:
    prefix = f".{base}.tmp-"
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split(".")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM back for the block (main thread only; elsewhere a no-op): one that
    arrives meanwhile is recorded and delivered to the handler in place when the block ends (a
    handler the block set, e.g. SIG_IGN, drops it), so the block is never cut in half. Handlers,
    not the thread's signal mask: a signal sent to the process may land on any thread (torch's,
    TVM's), and Python runs its handler in the main thread all the same."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def hold(signum, _frame):
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            if signal.getsignal(s) is hold:  # the block did not set its own
                signal.signal(s, handler)
        if received:
            handler = signal.getsignal(received[0])
            if callable(handler):
                handler(received[0], None)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, on_commit=None):
    """Yield a fresh staging directory beside ``out``; when the block ends normally it replaces
    ``out`` whole (:func:`replace_dir`); on any exception (Ctrl-C included) it is deleted and
    ``out`` is left as it was.

    The swap, the removal of the previous result and ``on_commit()`` (if given) run with SIGINT
    and SIGTERM held back, so an interrupt lands before the swap (``out`` as it was) or after
    ``on_commit`` ran (the caller knows ``out`` is the new result), never in between."""
    out = os.path.abspath(os.fspath(out))
    parent, base = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_stages(parent, base)
    stage = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        with _signals_held():
            replace_dir(stage, out)
            if on_commit is not None:
                on_commit()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
