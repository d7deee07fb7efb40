"""Hostile files and careless paths (issue 35): nothing executes from data (a crafted pickle in a
checkpoint, a model directory with its own code), writes stay inside the named output (planted lock
links, a user's directory as --out, '' and root-like paths), eval and bench write their report sets as
one unit (killed, or on a full disk), and a SIGKILLed bench leaves no measuring child behind.

Each CLI case checks the exit status, exactly one error line, no traceback, every file present before
unchanged (by hash), no new file outside the named output, and that no marker file appeared (the
crafted pickle and the model's module would each create one if their code ran)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import ROOT, write_class_data, write_recipe
from test_bad_input import error_lines, snapshot

from distill.cli import cli
from distill.fileio import check_output_dir
from distill.models import loading


class Crafted:
    """Pickled into a checkpoint file: unpickling it calls os.system, which creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def sec(tmp_path_factory, tiny_model):
    """A cache, a training run stopped after one step (a checkpoint to resume), a model directory whose
    config maps classes to its own module, and an eval report set."""
    tmp = tmp_path_factory.mktemp("sec")
    data = write_class_data(tmp / "d.jsonl")
    recipe = write_recipe(tmp / "r.yaml", data, tmp / "w", tiny_model, student={"num_layers": 1},
                          checkpoint_every=1)
    runner = CliRunner()
    for args in (["generate", str(recipe), "--backend", "transformers"],
                 ["train", str(recipe), "--out", str(tmp / "stopped"), "--stop-after-steps", "1"],
                 ["eval", tiny_model, "--recipe", str(recipe), "--out", str(tmp / "report")]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output[-3000:]
    assert (tmp / "stopped" / "checkpoints" / "step-00000001" / "state.pt").is_file()
    marker = tmp / "MARKER"
    evil = tmp / "evil-model"
    shutil.copytree(tiny_model, evil)
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    evil_tok = tmp / "evil-tokenizer"
    shutil.copytree(tiny_model, evil_tok)
    tcfg = json.loads((evil_tok / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (evil_tok / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (evil_tok / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    victim = tmp / "victim.txt"
    victim.write_text("a user's file that no run may touch\n")
    return {"tmp": tmp, "recipe": recipe, "model": tiny_model, "marker": marker, "evil": evil,
            "evil_tok": evil_tok, "victim": victim}


def _new_files(before: dict, after: dict, out: Path | None) -> list[str]:
    inside = str(out.resolve()) + os.sep if out else None
    return [p for p in after if p not in before and not (inside and str(Path(p).resolve()).startswith(inside))]


def run_case(sec, args, code: int, expected: str, out: Path | None = None, closed_stdin: bool = False) -> str:
    """Run one refused command; every check of the module docstring. Returns its error line."""
    roots = [sec["tmp"], sec["model"]]
    before = snapshot(*roots)
    if closed_stdin:  # a prompt on stdin would read EOF here instead of waiting for an answer
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.run([sys.executable, "-m", "distill", *map(str, args)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300, cwd=sec["tmp"], env=env)
        exit_code, text = p.returncode, p.stdout + p.stderr
    else:
        res = CliRunner().invoke(cli, [str(a) for a in args])
        exit_code, text = res.exit_code, res.output
    after = snapshot(*roots)
    lines = error_lines(text)
    assert exit_code == code, text[-2000:]
    assert len(lines) == 1, text[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in text, text[-2000:]
    assert not sec["marker"].exists(), "code from a file ran"
    changed = [p for p, sig in before.items() if after.get(p) != sig]
    assert not changed, changed
    assert not _new_files(before, after, out), _new_files(before, after, out)
    return lines[0]


def _checkpoint_copy(sec, name: str) -> tuple[Path, Path]:
    out = sec["tmp"] / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(sec["tmp"] / "stopped", out)
    return out, out / "checkpoints" / "step-00000001"


# ------------------------------------------------------------------ nothing executes from data

@pytest.mark.parametrize("file", ["state.pt", "optimizer.pt", "rng-rank0.pt"])
def test_resume_refuses_a_crafted_pickle_without_running_it(sec, file):
    out, ck = _checkpoint_copy(sec, f"crafted-{file}")
    torch.save({"format": 3, "payload": Crafted(sec["marker"])}, ck / file)
    line = run_case(sec, ["train", sec["recipe"], "--out", out, "--resume"], 2, file, out)
    assert "not loaded" in line and "--resume" in line


@pytest.mark.parametrize("content, expected", [
    (lambda ck: torch.save([1, 2, 3], ck / "state.pt"), "holds a list, not a checkpoint record"),
    (lambda ck: (ck / "state.pt").write_bytes((ck / "state.pt").read_bytes()[:200]), "not readable"),
], ids=["a list", "truncated"])
def test_resume_refuses_a_state_file_that_is_not_a_checkpoint(sec, content, expected):
    out, ck = _checkpoint_copy(sec, f"odd-state-{expected[:6].replace(' ', '')}")
    content(ck)
    run_case(sec, ["train", sec["recipe"], "--out", out, "--resume"], 2, expected, out)


def test_eval_of_a_model_with_its_own_code_refuses_without_prompting(sec):
    line = run_case(sec, ["eval", sec["evil"], "--recipe", sec["recipe"], "--out", sec["tmp"] / "ev-evil"], 2,
                    "auto_map", sec["tmp"] / "ev-evil", closed_stdin=True)
    assert str(sec["evil"] / "config.json") in line and "--trust-remote-code" in line


def test_train_with_a_student_model_with_its_own_code_refuses_without_prompting(sec):
    r = yaml.safe_load(sec["recipe"].read_text())
    r["train"]["student"] = {"model": str(sec["evil"]), "num_layers": 1}
    p = sec["tmp"] / "evil-student.yaml"
    p.write_text(yaml.safe_dump(r))
    out = sec["tmp"] / "tr-evil"
    line = run_case(sec, ["train", p, "--out", out], 2, "auto_map", out, closed_stdin=True)
    assert "config.json" in line and "--trust-remote-code" in line


def test_a_tokenizer_with_its_own_code_is_refused_naming_its_file(sec):
    out = sec["tmp"] / "ev-evil-tok"
    line = run_case(sec, ["eval", sec["evil_tok"], "--recipe", sec["recipe"], "--out", out], 2, "auto_map", out)
    assert "tokenizer_config.json" in line


def test_export_and_bench_of_a_model_with_its_own_code_refuse(sec):
    out = sec["tmp"] / "evil.gguf"
    run_case(sec, ["export", sec["evil"], "--out", out, "--quant", "f16"], 2, "--trust-remote-code", out)
    out = sec["tmp"] / "bench-evil"
    run_case(sec, ["bench", sec["recipe"], "--teacher", sec["evil"], "--student", sec["model"], "--out", out,
                   "--limit", "6"], 2, "auto_map", out)


def test_with_the_flag_a_warning_names_the_file(sec, caplog):
    loading.allow_remote_code(True)
    try:
        with caplog.at_level("WARNING"):
            loading.check_remote_code(sec["evil"])
    finally:
        loading.allow_remote_code(False)
    assert str(sec["evil"] / "config.json") in caplog.text and "--trust-remote-code" in caplog.text
    assert not sec["marker"].exists()  # the check reads JSON; it imports nothing


# ------------------------------------------------------------------ writes stay inside

def test_a_lock_link_planted_in_a_cache_leaves_its_target_untouched(sec):
    cache = sec["tmp"] / "planted-cache"
    cache.mkdir(exist_ok=True)
    (cache / ".lock").unlink(missing_ok=True)
    (cache / ".lock").symlink_to(sec["victim"])
    run_case(sec, ["generate", sec["recipe"], "--backend", "transformers", "--out", cache], 2, ".lock", cache)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_lock_link_planted_in_a_model_out_leaves_its_target_untouched(sec, link):
    out = sec["tmp"] / f"planted-out-{link}"
    out.mkdir(exist_ok=True)
    (out / ".lock").unlink(missing_ok=True)
    (out / ".lock").symlink_to(sec["victim"]) if link == "symlink" else os.link(sec["victim"], out / ".lock")
    run_case(sec, ["train", sec["recipe"], "--out", out], 2, ".lock", out)


def test_a_link_planted_as_a_checkpoints_temporary_name_is_removed_not_followed(sec):
    out, _ = _checkpoint_copy(sec, "planted-tmp")
    victim = sec["tmp"] / "victim-dir"
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("mine\n")
    before = snapshot(victim)
    (out / "checkpoints" / ".tmp-step-00000002").symlink_to(victim, target_is_directory=True)
    res = CliRunner().invoke(cli, ["train", str(sec["recipe"]), "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output[-2000:]
    assert snapshot(victim) == before and sorted(os.listdir(victim)) == ["keep.txt"]
    assert not (out / "checkpoints" / ".tmp-step-00000002").is_symlink()
    assert json.loads((out / "training.json").read_text())["resumed_from"].endswith("step-00000001")


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_a_report_out_holding_a_users_file_is_refused(sec, command):
    out = sec["tmp"] / f"user-dir-{command}"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("mine\n")
    args = (["eval", sec["model"], "--recipe", sec["recipe"]] if command == "eval" else
            ["bench", sec["recipe"], "--teacher", sec["model"], "--student", sec["model"]])
    run_case(sec, args + ["--out", out], 2, str(out), out)


def test_train_out_holding_a_users_file_is_refused(sec):
    out = sec["tmp"] / "user-dir-train"
    out.mkdir(exist_ok=True)
    (out / "README.md").write_text("my project\n")
    (out / "notes.txt").write_text("mine\n")
    run_case(sec, ["train", sec["recipe"], "--out", out], 2, str(out), out)


def test_export_over_a_users_file_is_refused(sec):
    run_case(sec, ["export", sec["model"], "--out", sec["victim"], "--quant", "f16"], 2, "not a GGUF")


@pytest.mark.parametrize("where", ["empty", "root", "home"])
def test_empty_and_root_like_outs_are_refused(sec, where, monkeypatch):
    home = sec["tmp"] / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    out = {"empty": "", "root": "/", "home": str(home)}[where]
    run_case(sec, ["eval", sec["model"], "--recipe", sec["recipe"], "--out", out], 2, "--out")


def test_check_output_dir_knows_each_commands_output(tmp_path):
    def make(name, *files):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).mkdir() if f.endswith("/") else (d / f).write_text("x")
        return d

    assert check_output_dir(make("new-empty")) == tmp_path / "new-empty"
    check_output_dir(make("model", "config.json", "model.safetensors", "training.json", "checkpoints/"), kind="model")
    check_output_dir(make("cache", "manifest.json", "train-00000.safetensors", ".lock"), kind="cache")
    check_output_dir(make("resumable", ".lock", "checkpoints/"), kind="model")
    for d, kind in ((make("downloaded", "config.json", "model.safetensors", "README.md"), "model"),
                    (make("report", "report.json", "predictions.jsonl"), "model"),
                    (make("mixed", "training.json", "notes.txt"), None)):
        with pytest.raises(Exception, match="--out"):
            check_output_dir(d, "--out", kind)


# ------------------------------------------------------------------ report sets are one unit

HOLDOUT = 6  # examples in the fixture's holdout split (a --limit 3 run is told apart by its count)


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _consistent(d: Path) -> int:
    report = json.loads((d / "report.json").read_text())
    assert len((d / "predictions.jsonl").read_text().splitlines()) == report["n"]
    return report["n"]


def test_eval_killed_between_files_leaves_the_previous_set_whole(sec):
    out = sec["tmp"] / "report"
    before = _files(out)
    assert _consistent(out) == HOLDOUT
    env = dict(os.environ, PYTHONPATH=str(ROOT), DISTILL_TEST_PAUSE="report_file:120:2")
    proc = subprocess.Popen([sys.executable, "-m", "distill", "eval", sec["model"], "--recipe", str(sec["recipe"]),
                             "--out", str(out), "--limit", "3"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            temps = list(out.parent.glob(f".{out.name}.set-{proc.pid}-*"))
            if temps and len(list(temps[0].iterdir())) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the pause"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert _files(out) == before  # the old set, whole: nothing of the killed run got in
    assert list(out.parent.glob(f".{out.name}.set-{proc.pid}-*")), "the killed run's partial set lies beside"
    res = CliRunner().invoke(cli, ["eval", sec["model"], "--recipe", str(sec["recipe"]), "--out", str(out),
                                   "--limit", "3"])
    assert res.exit_code == 0, res.output[-2000:]
    assert _consistent(out) == 3 and sorted(_files(out)) == sorted(before)
    assert not list(out.parent.glob(f".{out.name}.set-*")), "the next run removes a killed run's leftovers"


def test_eval_on_a_full_disk_keeps_the_previous_report_set(sec, small_disk):
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small_disk)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    out = small_disk / "report"
    args = ["eval", sec["model"], "--recipe", str(sec["recipe"]), "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output[-2000:]
    before = _files(out)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 16384))  # room for less than the new set
    res = CliRunner().invoke(cli, args + ["--limit", "3"])
    assert res.exit_code == 1, res.output[-2000:]
    assert len(error_lines(res.output)) == 1 and "no space left" in error_lines(res.output)[0], res.output[-2000:]
    assert _files(out) == before and _consistent(out) == HOLDOUT
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "report"]  # no partial set left


# ------------------------------------------------------------------ children die with their parent

def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie has exited (its new parent may never reap it here)


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except (FileNotFoundError, ProcessLookupError):
                continue
            todo += list(kids - found)
            found |= kids
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_with_die_with_parent_dies_with_a_sigkilled_parent(tmp_path):
    code = ("import functools, os, subprocess, sys, time\n"
            "from distill.fileio import die_with_parent\n"
            "p = subprocess.Popen(['sleep', '300'], preexec_fn=functools.partial(die_with_parent, os.getpid()))\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    child = int(parent.stdout.readline())
    assert not _gone(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.time() + 10
    while time.time() < deadline and not _gone(child):
        time.sleep(0.05)
    assert _gone(child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_bench_leaves_no_measuring_child(sec, tmp_path):
    err = tmp_path / "stderr"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DISTILL_TEST_PAUSE="bench_scored:300")
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "distill", "bench", str(sec["recipe"]), "--teacher",
                                 sec["model"], "--student", sec["model"], "--out", str(tmp_path / "b"),
                                 "--limit", "6"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f,
                                env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and "bench " not in err.read_text():
            time.sleep(0.1)  # the child's progress bar: it is scoring, then pauses
        assert proc.poll() is None, err.read_text()[-2000:]
        time.sleep(1.0)
        kids = _descendants(proc.pid)
        assert kids, "bench runs its measurements in a child process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    deadline = time.time() + 30
    while time.time() < deadline and not all(_gone(k) for k in kids):
        time.sleep(0.1)
    assert all(_gone(k) for k in kids), [k for k in kids if not _gone(k)]
