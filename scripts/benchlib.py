"""What the benchmark scripts share: their data paths, peak memory, child processes, free ports and the
versions a figure was measured with, so each script keeps only what it measures.

Scripts import it as `import benchlib` (Python puts a script's own folder on sys.path); distill itself
is the installed package.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

from distill.teacher.launch import free_port
from distill.versions import versions as library_versions

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # data sets kept beside the repository, never inside it

__all__ = ["ROOT", "SHARED_DATA", "add_data_flag", "children_peak_rss_mib", "free_port", "load_avg",
           "peak_rss_mib", "reset_peak", "rss_mib", "run_child", "versions"]


def add_data_flag(ap: argparse.ArgumentParser, default: str, what: str) -> None:
    """--data: a data set outside the repository, by default SHARED_DATA/default (../shared/data/...)."""
    ap.add_argument("--data", type=Path, default=SHARED_DATA / default,
                    help=f"{what} (default: ../shared/data/{default} beside the repository)")


def _status_kib(field: str) -> int | None:
    """A memory line of /proc/self/status in KiB (Linux), None elsewhere."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak() -> bool:
    """Reset this process's peak resident memory (VmHWM), so peak_rss_mib() measures from here; False
    where the kernel does not allow it (the peak then counts from the process's start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: VmHWM (which reset_peak resets), else getrusage's."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def rss_mib() -> float:
    """This process's resident memory now, in MiB (NaN where /proc is not there)."""
    kib = _status_kib("VmRSS")
    return float("nan") if kib is None else kib / 1024


def children_peak_rss_mib() -> float:
    """The peak resident memory of the largest child process this process waited for, in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux


def run_child(cmd: list, marker: str = "", env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd to its end and return the JSON of its last stdout line that starts with `marker` (the
    marker removed); a failed child or one that printed no such line ends this script with the
    command and the tail of the child's output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          env=None if env is None else {**os.environ, **env})
    lines = [x[len(marker):] for x in proc.stdout.splitlines() if x.startswith(marker) and x.strip()]
    if proc.returncode or not lines:
        sys.exit(f"{' '.join(map(str, cmd[:6]))} ... failed (exit {proc.returncode}):\n"
                 f"{proc.stdout[-1000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def versions(*extra: str) -> dict[str, str]:
    """Python's and the libraries' versions (distill.versions, plus `extra` packages)."""
    return {"python": platform.python_version(), **library_versions(*extra)}


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
