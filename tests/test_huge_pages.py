"""The `distill` command puts torch's large CPU tensors on transparent huge pages (cli.py): in a process
that ran it, a tensor the size of SmolLM2's embedding gradient is backed by huge pages; with
THP_MEM_ALLOC_ENABLE=0 set by the user, it is not. Each case in its own process: torch reads the
setting once."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, re
from distill.cli import cli
cli(["doctor", "--help"], standalone_mode=False)  # the group's set-up runs before any subcommand
import torch

def huge_kb():
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", open("/proc/self/smaps_rollup").read()).group(1))

before = huge_kb()
grad = torch.zeros(49152 * 576)  # 113 MB of float32, touched
print(json.dumps({"huge_kb": huge_kb() - before}))
"""
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def probe(env_value=None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["huge_kb"]


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_large_tensors_get_huge_pages_unless_the_user_turns_it_off():
    assert probe() >= 100 * 1024  # nearly all of the 110,592 kB
    assert probe("0") == 0
