"""Atomic file writes: a file the tool writes appears complete or not at all."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from distill.errors import DistillError, UsageError


def disk_full(path, e: OSError) -> DistillError:
    return DistillError(f"{path}: no space left on the device ({e.strerror}); nothing already finished was lost. "
                        "Free some space and run the same command again to continue.")


def ran_out_of_space(path, e: BaseException) -> bool:
    """Whether `e`, raised while writing under `path`, came from a full disk. torch.save and
    safetensors report it as RuntimeError / SafetensorError with the OS error in the text, so the
    free space left is the final word."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, Exception):
        return False
    text = str(e)
    if "No space left" in text or "os error 28" in text or "StorageFull" in text:
        return True
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, e) from None
        raise
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root` and the directories holding them, so a rename after it publishes
    data that is on the disk, not only in the page cache."""
    root = Path(root)
    for d, _, files in os.walk(root):
        for f in files:
            fsync_file(Path(d) / f)
        fsync_file(d)


def publish_files(tmp: Path, out: Path) -> None:
    """Move every file of the finished directory `tmp` into `out`, each by an atomic rename after an
    fsync, then remove `tmp`. A reader of `out` sees each file whole, old or new, never half written."""
    out.mkdir(parents=True, exist_ok=True)
    fsync_tree(tmp)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            dest = out / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    fsync_file(out)
    shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_pause_hits: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Tests interrupt runs at chosen points: DISTILL_TEST_PAUSE=NAME:SECONDS[:NTH] sleeps there each
    time the point is reached, or only the NTH time; a no-op otherwise. Points: after_shard,
    before_record (generate), checkpoint_written, model_written (train), export_written,
    export_verified (export)."""
    point, _, rest = os.environ.get("DISTILL_TEST_PAUSE", "").partition(":")
    if point != name or not rest:
        return
    secs, _, nth = rest.partition(":")
    _pause_hits[name] = _pause_hits.get(name, 0) + 1
    if not nth or _pause_hits[name] == int(nth):
        time.sleep(float(secs))


@contextlib.contextmanager
def directory_lock(directory: str | Path, refusal: str):
    """Hold DIRECTORY/.lock while writing there; a second writer is refused with `refusal` (which may
    name the holder as {holder}). The OS frees the lock on any exit, a SIGKILL included."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / ".lock", "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UsageError(f"{directory}: " + refusal.format(holder=holder)) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()
