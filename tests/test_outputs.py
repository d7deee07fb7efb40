"""No command writes over its inputs or over another run's output, and none leaves a child behind.

- an export into its source model (or a LoRA adapter's base) and a train whose --out is the teacher
  are refused with exit 2 before any work, and leave every file there byte for byte as it was;
- a second `distill train` to an --out another one is writing is refused while the first runs;
- Ctrl-C (SIGINT to the process group) and SIGTERM (to the CLI alone) stop `distill bench` and
  `distill export` while a child process works: exit 130, one "interrupted" line, no traceback,
  no process left.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_default, write_class_data, write_recipe

CMD = [sys.executable, "-m", "distill"]


def tree_state(root: Path) -> dict:
    """Every file under `root` with its sha256, and every directory: what "intact" compares."""
    state = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        state[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def cli(*args):
    from click.testing import CliRunner

    from distill.cli import cli as distill_cli

    return CliRunner().invoke(distill_cli, list(map(str, args)))


@pytest.fixture
def own_model(tmp_path, tiny_model) -> Path:
    """A private copy of the tiny model, so a test that fails cannot damage the shared one."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


# ---------------------------------------------------------------- outputs over inputs

@pytest.mark.parametrize("rel", ["model.safetensors", "sub/x.gguf", "."])
def test_export_into_its_source_is_refused_and_leaves_it_intact(own_model, rel):
    before = tree_state(own_model)
    out = own_model / rel
    r = cli("export", own_model, "--quant", "f16", "--no-verify", "--out", out)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"--out {out}" in line and f"the source model ({own_model})" in line
    assert tree_state(own_model) == before


def test_export_of_an_adapter_into_its_base_is_refused(own_model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(own_model),
                                                             "peft_type": "LORA"}))
    before = tree_state(own_model)
    r = cli("export", adapter, "--quant", "f16", "--no-verify", "--out", own_model / "merged.gguf")
    assert r.exit_code == 2 and "the adapter's base model" in r.output and str(own_model) in r.output, r.output
    assert tree_state(own_model) == before


def _train_recipe(tmp_path: Path, teacher: Path) -> Path:
    """alpha 0 (no teacher cache to build), a 1-layer student cut from the teacher."""
    data = write_class_data(tmp_path / "d.jsonl")
    return write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", str(teacher), alpha=0.0,
                        student={"num_layers": 1})


def test_train_into_the_teacher_is_refused_and_leaves_it_intact(own_model, tmp_path):
    recipe = _train_recipe(tmp_path, own_model)
    before = tree_state(own_model)
    for out in (own_model, own_model / "student"):
        r = cli("train", recipe, "--out", out)
        assert r.exit_code == 2, r.output[-2000:]
        refused = "the teacher" in r.output or "distill did not write" in r.output  # the CLI's --out check: first
        assert f"--out {out}" in r.output and refused and "Traceback" not in r.output
        assert tree_state(own_model) == before, f"--out {out} changed the teacher"


def test_a_second_train_to_the_same_out_is_refused_while_the_first_runs(tiny_model, tmp_path):
    recipe = _train_recipe(tmp_path, Path(tiny_model))
    out = tmp_path / "student"
    env = dict(os.environ, DISTILL_TEST_PAUSE="checkpoint_written:120:1")  # the first holds OUT/.lock there
    first = subprocess.Popen([*CMD, "train", str(recipe), "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / ".lock").is_file() and (out / ".lock").read_text() == f"pid {first.pid}"):
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first train never took its lock"
            time.sleep(0.2)
        second = subprocess.run([*CMD, "train", str(recipe), "--out", str(out)], capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
        assert second.returncode == 2, second.stderr[-2000:]
        assert "another `distill train`" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait(30)


# ---------------------------------------------------------------- children stop with their parent

def _start(args, env_pause: str, log: Path):
    env = dict(os.environ, DISTILL_TEST_PAUSE=env_pause)
    with open(log, "w") as err:
        return subprocess.Popen([*CMD, *map(str, args)], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True,  # its own group: the test's Ctrl-C reaches it alone
                                preexec_fn=sigint_default)


def _wait_for(cond, proc, log: Path, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"never {what}:\n{log.read_text()[-2000:]}"
        time.sleep(0.2)


def _interrupt_and_check(proc, sig: str, log: Path, children) -> None:
    """Ctrl-C is SIGINT to the whole foreground group; a scheduler's stop is SIGTERM to the CLI."""
    psutil = pytest.importorskip("psutil")
    try:
        if sig == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    err = log.read_text()
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"{sig}: left running: {alive}"
    assert rc == 130, (rc, err[-2000:])
    assert "Traceback" not in err and err.count("interrupted") == 1, err[-2000:]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_bench_leaves_no_process_and_no_traceback(tiny_model, tmp_path, sig):
    psutil = pytest.importorskip("psutil")
    data = write_class_data(tmp_path / "d.jsonl", copies=1)
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", tiny_model)
    log = tmp_path / "bench.log"
    proc = _start(["bench", "--recipe", recipe, "--teacher", tiny_model, "--student", tiny_model,
                   "--latency-examples", 2, "--batch-size", 2], "bench_scored:300", log)
    try:
        # the teacher's process has scored the holdout and sits in its measurement (a 300 s pause)
        _wait_for(lambda: "bench model" in log.read_text() and "100%" in log.read_text(), proc, log,
                  "measured the teacher")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("multiprocessing" in " ".join(c.cmdline()) for c in children), children
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    _interrupt_and_check(proc, sig, log, children)
    assert not (tmp_path / "w" / "bench").exists()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_export_stops_its_llama_cpp_child(tiny_model, tmp_path, sig):
    """Verification with llama.cpp runs in a child (held there 300 s): it goes with the CLI."""
    pytest.importorskip("llama_cpp")
    psutil = pytest.importorskip("psutil")
    log = tmp_path / "export.log"
    out = tmp_path / "out" / "m.gguf"
    proc = _start(["export", tiny_model, "--quant", "f16", "--verify-with", "llama_cpp", "--out", out],
                  "llama_job:300", log)
    try:
        def in_job():
            return any("_job(" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children())
        _wait_for(in_job, proc, log, "started its llama.cpp child")
        time.sleep(2)  # imported and sleeping at the pause point
        children = psutil.Process(proc.pid).children(recursive=True)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    _interrupt_and_check(proc, sig, log, children)
    assert not out.exists() and not list(out.parent.iterdir())
