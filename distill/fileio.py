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


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; elsewhere a no-op). Call it first thing in a child (as a subprocess preexec_fn,
    or at the top of a multiprocessing target); with `parent_pid`, a parent that died before the call
    (the child was re-parented) ends the child at once."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out` in one rename; the previous `out`, if any, ends at `tmp`
    and is removed. A reader sees the old set or the new one, never a mix."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if not _exchange(tmp, out):  # no atomic swap here: move the old set aside first (out briefly absent)
        old = tmp.with_name(tmp.name + "-old")
        os.rename(out, old)
        os.rename(tmp, out)
        os.rename(old, tmp)
    if tmp.is_symlink():  # `out` was a link: the link moved aside, never what it pointed to
        tmp.unlink()
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_sets(out: Path) -> None:
    """Temporary sets that a killed writer of `out` left beside it (their pid, in the name, is gone)."""
    for d in out.parent.glob(f".{out.name}.set-*"):
        pid = d.name[len(f".{out.name}.set-"):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def write_file_set(out_dir: str | Path, files: dict[str, bytes | str]) -> None:
    """Write the files of a report (eval's, bench's) as one unit: into a temporary directory beside
    `out_dir`, fsynced, then renamed into place. A run killed, or a disk that fills, at any point leaves
    the previous set whole; `out_dir` must hold nothing but such a set (its old files are replaced)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_sets(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.set-{os.getpid()}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        for name, data in files.items():
            (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
            pause_point("report_file")
        fsync_tree(tmp)
        pause_point("report_written")
        _replace_dir(tmp, out_dir)
        fsync_file(out_dir.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(out_dir, e) from None
        raise


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
    export_verified (export), report_file (after each file of a report set), report_written (the set
    complete, before its rename), bench_scored (bench's measuring child), llama_job."""
    point, _, rest = os.environ.get("DISTILL_TEST_PAUSE", "").partition(":")
    if point != name or not rest:
        return
    secs, _, nth = rest.partition(":")
    _pause_hits[name] = _pause_hits.get(name, 0) + 1
    if not nth or _pause_hits[name] == int(nth):
        time.sleep(float(secs))


def open_lock_file(path: str | Path):
    """Open (creating if needed) a lock file for reading and writing without following a link: a
    symlink or a hard link planted under the lock's name would make the writer truncate someone
    else's file, so anything but a plain file with one name is refused."""
    import stat

    path = Path(path)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{path}: is a symbolic link; a lock file must be a plain file "
                             "(remove the link and run the same command again)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise UsageError(f"{path}: is not a plain file with a single name; a lock file must be one "
                         "(remove it and run the same command again)")
    return os.fdopen(fd, "r+")


@contextlib.contextmanager
def directory_lock(directory: str | Path, refusal: str):
    """Hold DIRECTORY/.lock while writing there; a second writer is refused with `refusal` (which may
    name the holder as {holder}). The OS frees the lock on any exit, a SIGKILL included."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    f = open_lock_file(directory / ".lock")
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


# What distill writes into an output directory, by kind: a model directory (train) with its checkpoints
# and on-policy rounds, a cache (generate), an eval report set, a bench report. A directory holding
# anything else holds a user's files, and a run must not mix its outputs into them.
_MODEL = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
          "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
          "tokenizer.model", "README.md", "training.json", "train_log.jsonl", "training.png", "checkpoints",
          "onpolicy", "logs"}  # logs: train.report_to's trackers
OUTPUT_KINDS = {  # kind: (the names it may hold, the names only distill writes: one must be there)
    "model": (_MODEL, {"training.json", "train_log.jsonl", "checkpoints", "onpolicy", ".lock"}),
    "cache": ({"manifest.json", ".manifest.lock", "teachers"}, {"manifest.json", ".lock", ".manifest.lock"}),
    "eval": ({"report.json", "confusion.csv", "confusion.png", "predictions.jsonl"}, {"report.json"}),
    "bench": ({"bench.json", "bench.md", "bench.png"}, {"bench.json"}),
}
_COMMANDS = {"model": "train", "cache": "generate", "eval": "eval", "bench": "bench"}
_PATTERNS = {"model": r"model-\d{5}-of-\d{5}\.safetensors", "cache": r"\w+-\d{5}\.safetensors|\.worker-\d+"}
_UNFINISHED = r"\.tmp[-\w.]*|\..+\.tmp"  # temporary names of writes a killed run left


def _kind_name(kind: str, name: str) -> bool:
    """Whether `name`, an entry of an output directory, is one distill writes into a `kind` directory."""
    import re

    if name in OUTPUT_KINDS[kind][0] or name == ".lock":
        return True
    return bool(re.fullmatch(_PATTERNS.get(kind, "") + "|" + _UNFINISHED, name))


def output_kind(path: str | Path, first: str | None = None) -> str | None:
    """The kind of distill output an existing non-empty directory holds (model, cache, eval, bench; `first`
    tried first: a directory holding only a `.lock` is any kind's), or None when it holds anything distill
    did not write there."""
    names = os.listdir(path)
    order = sorted(OUTPUT_KINDS.items(), key=lambda kv: kv[0] != first)
    for kind, (_, signature) in order:
        if (signature.intersection(names) or kind == "cache" and _teacher_caches(path)) and \
                all(_kind_name(kind, n) for n in names):
            return kind
    return None


def _teacher_caches(path: str | Path) -> bool:
    """Whether `path` holds a `teachers/` of teachers' caches only (cache/ensemble.py): one brought from
    another machine before the cache's first `distill generate` has no manifest of its own yet."""
    t = Path(path) / "teachers"
    subs = list(t.iterdir()) if t.is_dir() and not t.is_symlink() else []
    return bool(subs) and all(p.is_dir() and output_kind(p, "cache") == "cache" for p in subs)


def root_like(path: Path) -> bool:
    """'/', a directory right below it (/tmp, /usr, /home), the home directory or one above it."""
    resolved = path.resolve()
    home = Path.home().resolve()
    return len(resolved.parts) <= 2 or resolved == home or resolved in home.parents


def check_output_dir(path, option: str = "--out", kind: str | None = None) -> Path:
    """Refuse an output directory that would write over a user's files or somewhere no run belongs:
    '' (an unset shell variable), '/', the home directory and other root-like paths, a file, and an
    existing non-empty directory that is not distill's own output (of `kind`, when given: model, cache,
    eval, bench), which a run resumed or repeated may replace. Returns the path."""
    text = "" if path is None else str(path)
    if not text.strip():
        raise UsageError(f"{option} '': an empty path; name the output directory")
    p = Path(text).expanduser()
    if root_like(p):
        raise UsageError(f"{option} {text}: a root or home directory; name a directory of its own for the output")
    if p.is_symlink() and not p.exists():
        raise UsageError(f"{option} {text}: is a link to nothing; name a directory")
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {text}: is a file, not a directory")
    if p.is_dir() and os.listdir(p):
        found = output_kind(p, kind)
        if found is None or (kind is not None and found != kind):
            what = (f"holds the output of `distill {_COMMANDS[found]}`, not of `distill {_COMMANDS[kind]}`" if found
                    else "holds files distill did not write")
            raise UsageError(f"{option} {text}: the directory {what}; name a new or empty directory "
                             f"(or one a previous {f'`distill {_COMMANDS[kind]}`' if kind else 'distill run'} wrote)")
    return p


def check_output_file(path, option: str = "--out", magic: bytes = b"GGUF") -> Path:
    """Refuse an output file path that is empty, root-like, a directory, or an existing file that does
    not start with `magic` (a file distill wrote before may be replaced, a user's may not)."""
    text = "" if path is None else str(path)
    if not text.strip():
        raise UsageError(f"{option} '': an empty path; name the file to write")
    p = Path(text).expanduser()
    if root_like(p) or p.is_dir():
        raise UsageError(f"{option} {text}: is a directory; name the file to write")
    if p.is_symlink():
        raise UsageError(f"{option} {text}: is a symbolic link; name a plain file to write")
    if p.exists():
        with open(p, "rb") as f:
            head = f.read(len(magic))
        if head != magic:
            raise UsageError(f"{option} {text}: an existing file that is not a {magic.decode(errors='replace')} "
                             "file distill wrote; name a new file")
    return p
