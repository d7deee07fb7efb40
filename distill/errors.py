"""Errors the CLI turns into one clear line and an exit status, never a traceback."""
from __future__ import annotations

import errno
import os
import re


class DistillError(Exception):
    """A failure while doing the work (exit status 1)."""

    exit_code = 1


class UsageError(DistillError):
    """Bad input from the user: a recipe key, a path, a data row (exit status 2)."""

    exit_code = 2


def where(path, line=None, key=None) -> str:
    """Format a location such as `data.jsonl:12` or `recipe.yaml: train.lr`."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if key is not None:
        loc += f": {key}"
    return loc


# Libraries whose ValueError/RuntimeError come from what the user gave them (a model, weights, labels).
INPUT_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "sklearn", "datasets", "tokenizers",
                   "huggingface_hub", "accelerate", "gguf", "llama_cpp")
# Errnos that mean the path the user named is wrong (missing, read-only, a directory): exit status 2.
PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
               errno.EEXIST, errno.ENAMETOOLONG}
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# Locals that name the file a frame is reading: the libraries' exceptions rarely carry it, the frame does.
_PATH_LOCALS = ("checkpoint_file", "resolved_archive_file", "file", "filename", "file_path", "path", "model_path",
                "p", "f", "pretrained_model_name_or_path", "model_id")


# The user:password@ part of any URL in a text (scheme://USERINFO@host): credentials given in a teacher URL.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")
# Environment variables that hold a teacher server's API key (distill's, then vLLM's own).
API_KEY_VARS = ("DISTILL_TEACHER_API_KEY", "VLLM_API_KEY")


def redact(text) -> str:
    """`text` without secrets: the user:password of every URL in it removed (`http://u:p@h/v1` ->
    `http://h/v1`), and the value of a teacher API key from the environment replaced by `***`.
    The one redaction every manifest, log line, doctor row and error line goes through."""
    out = _USERINFO.sub(r"\1", str(text))
    for var in API_KEY_VARS:
        key = os.environ.get(var)
        if key and len(key) >= 4:
            out = out.replace(key, "***")
    return out


def one_line(text, limit: int = 600) -> str:
    text = " ".join(redact(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frames(e: BaseException):
    tb = e.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _package(frame) -> str:
    return str(frame.f_globals.get("__name__", "")).split(".")[0]


def file_in_traceback(e: BaseException) -> str | None:
    """The innermost existing file a frame of the traceback was working on, if any."""
    for frame in reversed(list(_frames(e))):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value) and os.path.exists(value):
                return str(value)
    return None


def _os_error(e: OSError) -> tuple[int, str]:
    if e.errno in DISK_FULL:
        return 1, (f"no space left on the device ({e.filename or 'while writing'}); finished work is kept. "
                   "Free some space and run the same command again.")
    code = 2 if e.errno in PATH_ERRNOS or e.errno is None else 1
    if e.filename is None:
        return code, one_line(e.strerror or e)
    names = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    return code, f"{names}: {one_line(e.strerror or e)}"


def _parse_error(e: BaseException) -> str | None:
    """JSON, YAML and text decoding errors, which mean a malformed input file."""
    import json

    where_ = file_in_traceback(e)
    prefix = f"{where_}: " if where_ else ""
    if isinstance(e, json.JSONDecodeError):
        return f"{prefix}not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return f"{prefix}not UTF-8 text ({e.reason} at byte {e.start})"
    try:
        import yaml
    except ImportError:  # pragma: no cover - yaml is a dependency
        return None
    if isinstance(e, yaml.YAMLError):
        mark = getattr(e, "problem_mark", None)
        name = mark.name if mark is not None and not str(mark.name).startswith("<") else where_
        loc = f"{name}:{mark.line + 1}: " if name and mark is not None else prefix
        return f"{loc}not valid YAML ({one_line(getattr(e, 'problem', None) or e)})"
    return None


def _library_error(e: BaseException) -> str | None:
    """An error raised inside a model, weights or metrics library on the user's input: a ValueError
    (PEFT, transformers, scikit-learn), or any error while such a library loads a file (a truncated
    safetensors, a file torch.load cannot unpickle)."""
    frames = [fr for fr in _frames(e) if _package(fr) in INPUT_LIBRARIES]
    if not frames or _package(list(_frames(e))[-1]) not in INPUT_LIBRARIES:
        return None
    loading = any("load" in fr.f_code.co_name or "open" in fr.f_code.co_name for fr in frames)
    if not (loading or isinstance(e, ValueError)):
        return None  # e.g. a shape error in a forward pass: a bug, reported as one
    lib = "safetensors" if type(e).__name__ == "SafetensorError" else _package(frames[-1])
    path = file_in_traceback(e)
    return f"{path + ': ' if path else ''}{lib}: {one_line(e)}"


def describe(e: BaseException) -> tuple[int, str]:
    """The exit status and the one line (without "error: ") for an exception that reached the CLI."""
    code, line = _describe(e)
    return code, redact(line)


def _describe(e: BaseException) -> tuple[int, str]:
    if isinstance(e, DistillError):
        return e.exit_code, str(e)
    if isinstance(e, OSError):
        return _os_error(e)
    msg = _parse_error(e) or _library_error(e)
    if msg is not None:
        return 2, msg
    return 1, f"internal error: {type(e).__name__}: {one_line(e)} (run with --debug for the traceback)"
