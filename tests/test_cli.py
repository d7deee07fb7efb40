"""The command line the same everywhere: every command line the README gave still works (at most a
deprecation line), the recipe is given one way per rule, and what a user types by mistake at the CLI (an
unset variable as --out, a root-like output, a name that climbs out, a seed out of range) is refused with
one line before anything is written. Ctrl-C advice resumes and never destroys."""
from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, write_class_data, write_recipe
from test_bad_input import error_lines, snapshot

from distill.cli import cli
from distill.config import Loss

# The stage each command hands its work to (replaced by a recorder in the parsing tests below).
STAGES = {"generate": ("distill.cache.generate", "run_generate"), "train": ("distill.train", "run_train"),
          "eval": ("distill.evaluate.evaluation", "run_eval"), "export": ("distill.export.pipeline", "export_gguf"),
          "bench": ("distill.evaluate.bench", "run_bench"), "doctor": ("distill.doctor", "run_doctor"),
          "serve-teacher": ("distill.teacher.launch", "serve_forever")}
DEPRECATION = "warning: --recipe is deprecated"

# Every command line of the README as it stood before the CLI was made uniform (placeholders filled in:
# {model} a model directory, {tmp} a scratch directory; recipes/ and teachers/ are the repository's).
README_LINES = [
    "eval teachers/smollm2-135m-instruct.yaml --recipe recipes/default.yaml --name teacher-zero-shot",
    "train recipes/default-teacher.yaml --out runs/default/teacher",
    "eval runs/default/teacher --recipe recipes/default.yaml",
    "generate recipes/default.yaml",
    "train recipes/default.yaml",
    "eval runs/default/student --recipe recipes/default.yaml",
    "generate recipes/default.yaml --teacher {model} --backend transformers --k 20 --teacher-url http://127.0.0.1:9",
    "serve-teacher teachers/smollm2-135m-instruct.yaml --port 8001 --host 127.0.0.1",
    f"train recipes/default.yaml --cache {{tmp}}/cache --init-from {{model}} --alpha 0.5 --loss "
    f"{typing.get_args(Loss)[1]} --resume",
    "eval {model} --recipe recipes/default.yaml --split holdout --data {tmp}/d.jsonl --shots 2",
    "export {model} --format gguf --quant q4_k_m --out {tmp}/F.gguf --recipe recipes/default.yaml",
    "bench --recipe recipes/default.yaml --teacher {model} --student {model} --student {model}",
    "doctor --recipe recipes/default.yaml --teacher {model} --cache {tmp}/cache --student {model}",
    "train recipes/default.yaml --set train.lora.r=8 --set train.jsd_beta=0.3",
    "--debug generate recipes/default.yaml",
    "generate recipes/default.yaml --out {tmp}/shared --worker 1/2",
    "export runs/default/student --quant q4_k_m --out student.gguf",
    "serve-teacher teachers/smollm2-135m-instruct.yaml --port 8000",
    "train recipes/default.yaml",  # accelerate launch ... -m distill train RECIPE: the same argv
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    """A scratch directory with the repository's recipes/ and teachers/ (the README's relative paths) and
    a tiny classification recipe."""
    tmp = tmp_path_factory.mktemp("cli")
    for name in ("recipes", "teachers"):
        (tmp / name).symlink_to(ROOT / name)
    data = write_class_data(tmp / "d.jsonl")
    recipe = write_recipe(tmp / "good.yaml", data, tmp / "w", tiny_model, student={"num_layers": 1})
    return {"tmp": tmp, "recipe": str(recipe), "model": tiny_model}


@pytest.fixture
def stages(monkeypatch):
    """Each stage replaced by a recorder that stops the command there (exit 0). A stand-in, since a real
    generate, train, export, bench or vLLM server takes minutes on 2 cores; their own tests run them. What
    runs for real is everything before: parsing, the recipe loaded and validated, the output checked."""
    calls = []

    def recorder(command):
        def stage(*args, **kwargs):
            from distill.models.loading import remote_code_allowed

            calls.append({"command": command, "args": args, "kwargs": kwargs, "remote_code": remote_code_allowed()})
            sys.exit(0)
        return stage

    for command, (module, fn) in STAGES.items():
        monkeypatch.setattr(importlib.import_module(module), fn, recorder(command))
    return calls


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def _recipe_of(call) -> Path:
    """The recipe file a stage was given (a Recipe's `path`; doctor gets the path itself)."""
    recipe = {"eval": lambda: call["args"][1], "export": lambda: call["kwargs"]["recipe"]}.get(
        call["command"], lambda: call["args"][0])()
    return Path(str(getattr(recipe, "path", recipe)))


@pytest.mark.parametrize("line", README_LINES)
def test_every_readme_command_line_still_works(env, stages, monkeypatch, line):
    monkeypatch.chdir(env["tmp"])
    args = shlex.split(line.format(model=env["model"], tmp=env["tmp"]))
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    command = next(a for a in args if not a.startswith("-"))
    assert [c["command"] for c in stages] == [command], res.output
    stderr = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert stderr == [] or (len(stderr) == 1 and stderr[0].startswith(DEPRECATION)), stderr
    assert bool(stderr) == ("--recipe" in args and command in ("bench", "doctor"))  # only the old spelling warns
    recipes = [a for a in args if a.startswith("recipes/")]
    if recipes:  # the stage got the recipe of the command line, whichever way it was given
        assert _recipe_of(stages[0]) == Path(recipes[0])


def test_the_recipe_is_the_first_argument_without_a_model_argument(env, stages):
    recipe, model = env["recipe"], env["model"]
    for args in (["generate", recipe], ["train", recipe], ["bench", recipe, "--teacher", model, "--student", model],
                 ["doctor", recipe], ["eval", model, "--recipe", recipe], ["export", model, "--out",
                                                                         env["tmp"] / "n.gguf", "--recipe", recipe]):
        stages.clear()
        res = invoke(*args)
        assert res.exit_code == 0 and res.stderr == "", res.output
        assert _recipe_of(stages[0]) == Path(recipe), args


def test_the_old_recipe_option_warns_once_and_means_the_same(env, stages):
    recipe, model = env["recipe"], env["model"]
    old = invoke("bench", "--recipe", recipe, "--teacher", model, "--student", model)
    new = invoke("bench", recipe, "--teacher", model, "--student", model)
    assert old.exit_code == new.exit_code == 0
    assert old.stderr.splitlines() == [f"{DEPRECATION} for `distill bench`: give the recipe as its first argument "
                                       "(distill bench RECIPE ...)"]
    assert stages[0]["args"][1:] == stages[1]["args"][1:] and stages[0]["kwargs"] == stages[1]["kwargs"]


def test_root_help_shows_two_runnable_examples(env, stages, monkeypatch):
    res = invoke("--help")
    assert res.exit_code == 0
    examples = [ln.strip() for ln in res.output.splitlines() if ln.strip().startswith("distill ")]
    assert examples == [
        "distill train recipes/default-teacher.yaml --out runs/default/teacher",  # the main job, as the README's
        "distill generate recipes/default.yaml && distill train recipes/default.yaml",
        "distill eval teachers/smollm2-135m-instruct.yaml --recipe recipes/default.yaml --name teacher-zero-shot"]
    assert "first argument" in res.output and "--recipe RECIPE" in res.output  # the rule
    monkeypatch.chdir(env["tmp"])
    for example in (part for line in examples for part in line.split(" && ")):
        assert invoke(*shlex.split(example)[1:]).exit_code == 0, example
    assert [c["command"] for c in stages] == ["train", "generate", "train", "eval"]
    readme = (ROOT / "README.md").read_text()
    assert all(part in readme for line in examples for part in line.split(" && "))


def test_every_command_has_help_and_the_module_entry_runs():
    for command in STAGES:
        res = invoke(command, "--help")
        assert res.exit_code == 0 and res.output.startswith(f"Usage: distill {command} "), res.output
    usage = {c: invoke(c, "--help").output.splitlines()[0] for c in ("generate", "train", "bench", "doctor")}
    assert usage["train"].endswith("RECIPE") and usage["doctor"].endswith("[RECIPE]")
    proc = subprocess.run([sys.executable, "-m", "distill", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--trust-remote-code" in proc.stdout


def test_trust_remote_code_flag_and_environment(env, stages):
    model, recipe = env["model"], env["recipe"]
    for root, environ, allowed in ([], {}, False), (["--trust-remote-code"], {}, True), \
            ([], {"DISTILL_TRUST_REMOTE_CODE": "1"}, True), ([], {"DISTILL_TRUST_REMOTE_CODE": "0"}, False):
        stages.clear()
        assert invoke(*root, "eval", model, "--recipe", recipe, env=environ).exit_code == 0
        assert stages[0]["remote_code"] is allowed, (root, environ)
    from distill.models.loading import remote_code_allowed

    invoke("eval", model, "--recipe", recipe)
    assert remote_code_allowed() is False  # the switch follows each command line, not an earlier one


@pytest.mark.parametrize("args, resume_hint", [
    (["train", "{r}"], "add --resume to the same command"),
    (["train", "{r}", "--resume"], "run the same command again (with its --resume)"),
    (["generate", "{r}"], "run the same command again to resume"),
    (["eval", "{m}", "--recipe", "{r}"], "run the same command again"),
])
def test_ctrl_c_advice_is_a_command_that_resumes(env, monkeypatch, args, resume_hint):
    """KeyboardInterrupt raised where the stage runs (a stand-in for pressing Ctrl-C at a chosen moment)."""
    command = args[0]
    module, fn = STAGES[command]

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), fn, interrupted)
    res = invoke(*[a.format(r=env["recipe"], m=env["model"]) for a in args])
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert res.stderr.splitlines() == [f"interrupted; {res.stderr.split('; ', 1)[1].strip()}"]
    assert resume_hint in res.stderr
    if command == "train" and "--resume" not in args:  # the same command without --resume deletes checkpoints
        assert "run the same command again" not in res.stderr


def bad_cases(env) -> list:
    t, r, m = env["tmp"], env["recipe"], env["model"]
    user_dir = t / "my-notes"
    user_dir.mkdir(exist_ok=True)
    (user_dir / "notes.txt").write_text("a user's own file\n")
    user_file = t / "notes.gguf.txt"
    user_file.write_text("not a GGUF\n")
    bench = ["bench", r, "--teacher", m, "--student", m]
    ev = ["eval", m, "--recipe", r]
    return [
        ("train --out '' (an unset shell variable)", ["train", r, "--out", ""], 2, "--out ''"),
        ("train --out /", ["train", r, "--out", "/"], 2, "--out /:"),
        ("train --out ~", ["train", r, "--out", "~"], 2, "--out ~:"),
        ("generate --out ''", ["generate", r, "--out", ""], 2, "--out ''"),
        ("generate --out /usr", ["generate", r, "--out", "/usr"], 2, "--out /usr:"),
        ("eval --out /", [*ev, "--out", "/"], 2, "--out /:"),
        ("bench --out the home directory", [*bench, "--out", Path.home()], 2, f"--out {Path.home()}:"),
        ("export --out ''", ["export", m, "--out", ""], 2, "--out ''"),
        ("export --out /", ["export", m, "--out", "/"], 2, "--out /:"),
        ("train --out a user's directory", ["train", r, "--out", user_dir], 2, f"--out {user_dir}:"),
        ("generate --out a user's directory", ["generate", r, "--out", user_dir], 2, f"--out {user_dir}:"),
        ("export --out a user's file", ["export", m, "--out", user_file], 2, "notes.gguf.txt"),
        ("eval --name climbing out", [*ev, "--name", "../escape"], 2,
         "'../escape': expected a name without path separators"),
        ("eval --name ..", [*ev, "--name", ".."], 2, "'..': expected a name without path separators"),
        ("eval --name with a separator", [*ev, "--name", "a/b"], 2, "'a/b': expected a name without path separators"),
        ("eval --name ''", [*ev, "--name", ""], 2, "'': expected a name without path separators"),
        ("train --seed 2**32", ["train", r, "--seed", 2**32], 2, "--seed: train.seed: expected"),
        ("train --seed -1", ["train", r, "--seed", -1], 2, "--seed: train.seed: expected"),
        ("the recipe given twice", ["train", r, "--recipe", r], 2, "the recipe is given twice"),
        ("train without a recipe", ["train"], 2, "Missing argument 'RECIPE'"),
        ("doctor --set without a recipe", ["doctor", "--set", "generate.k=3"], 2, "distill doctor RECIPE --set"),
        ("DISTILL_TRUST_REMOTE_CODE not a boolean", ["doctor", "--help"], 2, "--trust-remote-code",
         {"DISTILL_TRUST_REMOTE_CODE": "maybe"}),
    ]


def test_bad_cli_input_is_one_line_and_writes_nothing(env, monkeypatch):
    monkeypatch.chdir(env["tmp"])  # a case that wrongly runs writes its relative outputs here
    table = bad_cases(env)
    assert len(table) >= 20 and len({name for name, *_ in table}) == len(table)
    failures = []
    for name, args, code, expected, *environ in table:
        before = snapshot(env["tmp"], env["model"])
        res = invoke(*args, env=environ[0] if environ else None)
        lines = error_lines(res.output)
        problems = [f"exit {res.exit_code}, expected {code}"] if res.exit_code != code else []
        problems += [f"{len(lines)} error lines"] if len(lines) != 1 else [] if expected in lines[0] else \
            [f"error line lacks {expected!r}"]
        if "Traceback" in res.output or not isinstance(res.exception, (SystemExit, type(None))):
            problems.append(f"raised {res.exception!r}")
        if snapshot(env["tmp"], env["model"]) != before:
            problems.append("files changed or added")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    {res.output.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_real_eval_and_doctor_on_the_tiny_model(env, monkeypatch):
    """The two cheap commands run for real: eval on the tiny model, doctor in both recipe spellings."""
    monkeypatch.chdir(env["tmp"])
    out = env["tmp"] / "ev"
    res = invoke("eval", env["model"], "--recipe", env["recipe"], "--limit", "3", "--name", "tiny", "--out", out)
    assert res.exit_code == 0 and "warning: " not in res.stderr, res.output
    assert (out / "report.json").is_file() and "tiny" in res.output
    again = invoke("eval", env["model"], "--recipe", env["recipe"], "--limit", "3", "--name", "tiny", "--out", out)
    assert again.exit_code == 0, again.output  # its own report directory may be written again
    new = invoke("doctor", env["recipe"], "--no-estimate", "--json")
    old = invoke("doctor", "--recipe", env["recipe"], "--no-estimate", "--json")
    assert new.exit_code == old.exit_code == 0, new.output
    assert old.stderr.startswith(DEPRECATION) and DEPRECATION not in new.stderr
    assert old.stdout == new.stdout
    assert os.path.exists(env["recipe"])
