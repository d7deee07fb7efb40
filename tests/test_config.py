"""Recipe checks without a model: the typed builder (YAML and --set alike), Literal choices, the one
validation pass, extends chains, the task.max_length move, label sets and the CLI's error lines."""
from __future__ import annotations

import dataclasses
import errno
import json
import sys
import types
import typing
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from distill import config
from distill.cli import cli, friendly_errors
from distill.config import Recipe, load_recipe, validate_recipe
from distill.errors import UsageError


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(path)


@pytest.fixture
def recipe(tmp_path):
    return write(tmp_path / "r.yaml",
                 {"name": "t", "workdir": str(tmp_path / "w"), "task": {"data": "builtin:default"}})


@pytest.fixture
def captured(monkeypatch):
    """`distill train` with a stand-in trainer that records the recipe it was given (no model, no torch)."""
    seen = {}
    fake = types.ModuleType("distill.train")
    fake.run_train = lambda r, **kw: seen.setdefault("recipe", r) and "model-dir"
    monkeypatch.setitem(sys.modules, "distill.train", fake)
    return seen


def run(*args, env=None):
    res = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    return res.exit_code, res.output


def error_line(output: str) -> str:
    lines = [x for x in output.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


# --- --set -------------------------------------------------------------------------------------


def test_set_creates_a_null_section_and_reaches_the_recipe(recipe, captured):
    code, out = run("train", recipe, "--set", "train.lora.r=16", "--set", "train.lora.target_modules=[q_proj,v_proj]",
                    "--set", "train.lr=1e-4", "--alpha", "0.25")
    assert code == 0, out
    r = captured["recipe"]
    assert r.train.lora.r == 16 and r.train.lora.target_modules == ["q_proj", "v_proj"]
    assert r.train.lora.alpha == 32  # the rest of a section created by --set keeps its defaults
    assert r.train.lr == 1e-4 and r.train.alpha == 0.25  # YAML 1.1's string "1e-4" read as a number


def test_set_over_an_explicit_null_and_back_to_null(tmp_path):
    path = write(tmp_path / "n.yaml", {"train": {"lora": None, "student": {"num_layers": 2}}})
    r = load_recipe(path, ["train.lora.r=8"])
    assert r.train.lora.r == 8 and r.train.lora.dropout == 0.05 and r.train.student.num_layers == 2
    assert load_recipe(path, ["train.lora.r=8", "train.lora=null"]).train.lora is None
    assert load_recipe(path, ["train.student.num_layers=null"]).train.student.num_layers is None


def test_mistyped_key_gives_the_same_line_through_set_and_yaml(tmp_path, recipe, captured):
    code_set, out_set = run("train", recipe, "--set", "train.lroa.r=16")
    bad = write(tmp_path / "bad.yaml", {**yaml.safe_load(open(recipe)), "train": {"lroa": {"r": 16}}})
    code_yaml, out_yaml = run("train", bad)
    assert code_set == code_yaml == 2
    line_set, line_yaml = error_line(out_set), error_line(out_yaml)
    assert line_set.startswith("error: --set train.lroa.r=16: unknown key 'train.lroa' (did you mean 'train.lora'?)")
    assert line_yaml.startswith(f"error: {bad}: ")
    assert line_set.split(": ", 2)[2] == line_yaml.split(": ", 2)[2]
    assert "recipe" not in captured


def test_wrong_type_through_set(recipe, captured):
    code, out = run("train", recipe, "--set", "train.lora.r=abc")
    assert code == 2
    assert error_line(out) == "error: --set train.lora.r=abc: train.lora.r: expected an integer, got 'abc'"
    code, out = run("train", recipe, "--set", "train.gradient_checkpointing=[1]")
    assert code == 2 and "train.gradient_checkpointing: expected true or false" in error_line(out)
    code, out = run("train", recipe, "--set", "no_equals_sign")
    assert code == 2 and "expected KEY=VALUE" in error_line(out)
    assert "recipe" not in captured


def test_every_command_that_reads_a_recipe_takes_set():
    for name in ("generate", "train", "eval", "bench", "doctor", "export"):
        assert any("--set" in p.opts for p in cli.commands[name].params), name
    code, out = run("train", "--help")
    assert code == 0 and "--set KEY=VALUE" in out and "stratified" in out and "first N training" not in out


# --- Literal choices ---------------------------------------------------------------------------


def test_literal_outside_the_choices(tmp_path, recipe):
    data = yaml.safe_load(open(recipe))
    with pytest.raises(UsageError,
                       match=r"s\.yaml: train\.schedule: expected one of cosine, linear, constant, got 'step'"):
        load_recipe(write(tmp_path / "s.yaml", {**data, "train": {"schedule": "step"}}))
    with pytest.raises(UsageError, match=r"--set train.student.quantization=8bit: .*expected one of 4bit, got '8bit'"):
        load_recipe(recipe, ["train.student.quantization=8bit"])
    qlora = load_recipe(recipe, ["train.student.quantization=4bit", "train.lora={}"])
    assert qlora.train.student.quantization == "4bit"
    with pytest.raises(UsageError, match="train.student.quantization: 4bit weights are frozen; QLoRA needs train.lora"):
        load_recipe(recipe, ["train.student.quantization=4bit"])  # a recipe check: config's, on any machine
    with pytest.raises(UsageError, match="generate.splits\\[0\\]: expected one of train, validation, got 'holdout'"):
        load_recipe(recipe, ["generate.splits=[holdout]"])


def test_cli_choices_are_the_config_literals():
    from distill.train.losses import DIVERGENCES

    assert typing.get_args(config.Loss) == DIVERGENCES
    opts = {p.name: p for p in cli.commands["train"].params}
    assert tuple(opts["loss"].type.choices) == DIVERGENCES
    gen = {p.name: p for p in cli.commands["generate"].params}
    assert tuple(gen["backend"].type.choices) == typing.get_args(config.Backend)


# --- ranges: one validation pass ---------------------------------------------------------------


@pytest.mark.parametrize("item, message", [
    ("train.max_grad_norm=-1", "train.max_grad_norm: expected a number > 0, got -1.0"),
    ("train.lr=-1", "train.lr: expected a number in (0, 1], got -1.0"),
    ("train.lr=1e30", "train.lr: expected a number in (0, 1], got 1e+30"),
    ("train.lora.r=0", "train.lora.r: expected at least 1, got 0"),
    ("train.lora.dropout=1", "train.lora.dropout: expected a number in [0, 1), got 1.0"),
    ("train.student.num_layers=0", "train.student.num_layers: expected at least 1, got 0"),
    ("train.student.from_teacher_layers=[0, 0]", "from_teacher_layers: expected distinct values, got 0 more than once"),
    ("train.student.from_teacher_layers=[]", "from_teacher_layers: expected at least one value"),
    ("task.split.holdout=-0.1", "task.split.holdout: expected a number in [0, 1), got -0.1"),
    ("task.max_length=8", "task.max_length: expected at least 16, got 8"),
    ("task.max_examples=0", "task.max_examples: expected at least 1, got 0"),
    ("train.seed=-1", "train.seed: expected a number in [0, 4294967295], got -1"),
    ("train.seed=4294967296", "train.seed: expected a number in [0, 4294967295], got 4294967296"),
    ("train.temperature=1e-30", "train.temperature: expected at least 0.05, got 1e-30"),
    ("train.on_policy.temperature=0.001", "train.on_policy.temperature: expected 0 or at least 0.05, got 0.001"),
    ("generate.top_p=0", "generate.top_p: expected a number in (0, 1], got 0.0"),
    ("generate.k=0", "generate.k: expected at least 1, got 0"),
    ("train.swamp_fraction=1", "train.swamp_fraction: expected a number in (0, 1), got 1.0"),
    ("train.alpha=1.5", "train.alpha: expected a number in [0, 1], got 1.5"),
    ("train.jsd_beta=2", "train.jsd_beta: expected a number in [0, 1], got 2.0"),
    ("train.temperature=.inf", "train.temperature: expected a finite number, got inf"),
    ("task.labels=[a, b, a]", "task.labels: expected distinct values, got a more than once"),
])
def test_ranges(recipe, item, message):
    with pytest.raises(UsageError) as e:
        load_recipe(recipe, [item])
    assert str(e.value).startswith(f"--set {item}: ") and message in str(e.value)


def test_ranges_from_a_file_and_from_options(tmp_path, recipe, captured):
    data = yaml.safe_load(open(recipe))
    bad = write(tmp_path / "grad.yaml", {**data, "train": {"max_grad_norm": -1}})
    code, out = run("train", bad)
    assert code == 2 and error_line(out) == f"error: {bad}: train.max_grad_norm: expected a number > 0, got -1.0"
    code, out = run("train", recipe, "--num-layers", "0")
    assert code == 2 and error_line(out) == "error: --num-layers: train.student.num_layers: expected at least 1, got 0"
    code, out = run("train", recipe, "--train-examples", "-3")
    assert code == 2 and "train.train_examples: expected at least 1, got -3" in error_line(out)
    assert "recipe" not in captured


def test_combinations(recipe):
    with pytest.raises(UsageError, match=r"r\.yaml: task\.split: validation \+ holdout must be below 1.*0\.5 \+ 0\.5"):
        load_recipe(recipe, ["task.split={validation: 0.5, holdout: 0.5}"])
    # an official holdout file: the holdout fraction is not taken from the data
    r = load_recipe(recipe, ["task.split={validation: 0.5, holdout: 0.5}", "task.holdout_data=test.jsonl"])
    assert r.task.split.validation == 0.5
    with pytest.raises(UsageError, match="val_f1 exists for classification only"):
        load_recipe(recipe, ["task.type=generation", "train.early_stopping_metric=val_f1"])


def test_validate_recipe_is_idempotent_and_sees_code_edits(tmp_path, recipe):
    r = load_recipe(recipe)
    validate_recipe(r)
    validate_recipe(r)
    validate_recipe(Recipe())
    r.workdir = tmp_path / "w2"  # a Path set in code is a path, not a type error
    validate_recipe(r)
    r.train.max_grad_norm = -1.0
    with pytest.raises(UsageError, match=r"r\.yaml: train\.max_grad_norm: expected a number > 0, got -1\.0"):
        validate_recipe(r)
    r = Recipe()
    r.train.loss = "kl"
    with pytest.raises(UsageError, match="^recipe: train.loss: expected one of forward_kl"):
        validate_recipe(r)


def test_every_number_has_a_range():
    """A new numeric key without an allowed range fails here, not in a GPU job."""
    missing = []
    for cls in (config.TeacherSpec, config.SplitConfig, config.TaskConfig, config.GenerateConfig,
                config.StudentConfig, config.LoraConfig, config.TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = config._unwrap_optional(hints[f.name])[0]
            tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if tp in (int, float) and "range" not in f.metadata:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing


def test_teacher_spec_ranges(tmp_path):
    spec = write(tmp_path / "t.yaml", {"name": "x", "source": "some/model", "gpu_memory_utilization": 1.5})
    with pytest.raises(UsageError, match=r"t\.yaml: gpu_memory_utilization: expected a number in \(0, 1\], got 1\.5"):
        config.load_teacher_spec(spec)
    spec = write(tmp_path / "t2.yaml", {"name": "x", "source": "some/model", "max_logprobs": 0})
    with pytest.raises(UsageError, match="max_logprobs: expected at least 1, got 0"):
        config.load_teacher_spec(spec)


# --- extends and the max_length move -----------------------------------------------------------


def test_extends_at_depth_three_keeps_the_grandparent(tmp_path):
    write(tmp_path / "a.yaml", {"name": "a", "train": {"lr": 0.5, "epochs": 3}, "task": {"instruction": "from a"}})
    write(tmp_path / "b.yaml", {"extends": "a.yaml", "train": {"epochs": 2, "seed": 7}})
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.yaml", {"extends": "../b.yaml", "train": {"epochs": 1}})
    r = load_recipe(tmp_path / "sub" / "c.yaml")
    assert (r.name, r.task.instruction, r.train.lr, r.train.seed, r.train.epochs) == ("a", "from a", 0.5, 7, 1)


def test_extends_cycle_is_refused(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "c.yaml"})
    write(tmp_path / "c.yaml", {"extends": "a.yaml"})
    with pytest.raises(UsageError, match="extends: a cycle") as e:
        load_recipe(tmp_path / "a.yaml")
    assert all(f"{n}.yaml" in str(e.value) for n in "abc") and "\n" not in str(e.value)
    write(tmp_path / "self.yaml", {"extends": "self.yaml"})
    with pytest.raises(UsageError, match="extends: a cycle"):
        load_recipe(tmp_path / "self.yaml")


def test_an_error_in_a_parent_names_the_parent(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"lr": -1}})
    write(tmp_path / "child.yaml", {"extends": "base.yaml"})
    with pytest.raises(UsageError, match=r"base\.yaml: train\.lr: expected a number in \(0, 1\]"):
        load_recipe(tmp_path / "child.yaml")


def test_train_max_length_still_works_with_a_deprecation(tmp_path, caplog):
    old = write(tmp_path / "old.yaml", {"train": {"max_length": 64}})
    with caplog.at_level("WARNING"):
        r = load_recipe(old)
    assert r.task.max_length == 64
    assert "old.yaml: train.max_length is deprecated; move it to task.max_length" in caplog.text
    same = write(tmp_path / "same.yaml", {"train": {"max_length": 64}, "task": {"max_length": 64}})
    assert load_recipe(same).task.max_length == 64
    both = write(tmp_path / "both.yaml", {"train": {"max_length": 64}, "task": {"max_length": 128}})
    with pytest.raises(UsageError, match=r"both\.yaml: train\.max_length \(64\) and task\.max_length \(128\) differ"):
        load_recipe(both)
    with pytest.raises(UsageError, match="task.max_length: expected at least 16, got 8"):
        load_recipe(write(tmp_path / "short.yaml", {"train": {"max_length": 8}}))
    # a child's task.max_length wins over its parent's deprecated train.max_length
    write(tmp_path / "child.yaml", {"extends": "old.yaml", "task": {"max_length": 200}})
    assert load_recipe(tmp_path / "child.yaml").task.max_length == 200


def test_shipped_recipes_load_without_deprecations(caplog):
    import glob

    with caplog.at_level("WARNING"):
        for path in sorted(glob.glob(str(Path(__file__).parents[1] / "recipes" / "*.yaml"))):
            load_recipe(path)
    assert "deprecated" not in caplog.text


# --- label sets --------------------------------------------------------------------------------


def test_duplicate_and_malformed_labels_files(tmp_path):
    from distill.config import TaskConfig
    from distill.data.read import label_set

    def labels(text, suffix):
        p = tmp_path / f"labels{suffix}"
        p.write_text(text)
        return label_set(TaskConfig(data="x.jsonl", labels_file=str(p)), "r.yaml")

    assert labels('["a", "b"]', ".json") == ["a", "b"]
    with pytest.raises(UsageError, match=r"labels\.json: label 'a' appears more than once"):
        labels('["a", "b", "a"]', ".json")
    with pytest.raises(UsageError, match=r"labels\.txt: label 'b' appears more than once"):
        labels("a\nb\n b \n", ".txt")
    with pytest.raises(UsageError, match=r"labels\.json:1: not valid JSON"):
        labels('["a", "b"', ".json")
    for blank in ("", "  \n"):
        with pytest.raises(UsageError, match=r"labels\.json: the labels file is empty"):
            labels(blank, ".json")
    with pytest.raises(UsageError, match=r"labels\.json: expected a JSON list of label names"):
        labels('{"a": 1}', ".json")


# --- one line per error at the CLI boundary ----------------------------------------------------


def _raising(exc):
    @click.command()
    @friendly_errors
    def boom():
        raise exc

    return boom


@pytest.mark.parametrize("exc, code, line", [
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out/report.json"), 2,
     "error: /ro/out/report.json: Permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/model.safetensors"), 2,
     "error: /x/model.safetensors: No such file or directory"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/ckpt"), 1, "error: no space left on the device (/x/ckpt)"),
    (json.JSONDecodeError("Expecting value", "{", 1), 2, "error: not valid JSON (Expecting value at line 1 column 2)"),
    (ZeroDivisionError("division by zero"), 1,
     "error: internal error: ZeroDivisionError: division by zero (run with --debug for the traceback)"),
    (UsageError("r.yaml: train.lr: expected a number > 0, got -1.0"), 2, "error: r.yaml: train.lr: expected"),
])
def test_exceptions_become_one_line(exc, code, line):
    res = CliRunner().invoke(_raising(exc), [])
    assert res.exit_code == code, res.output
    assert res.output.startswith(line) and res.output.count("\n") == 1 and "Traceback" not in res.output


def test_yaml_error_names_its_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("a: [1, 2\n")

    @click.command()
    @friendly_errors
    def boom():
        with open(p) as f:
            yaml.safe_load(f)

    res = CliRunner().invoke(boom, [])
    assert res.exit_code == 2 and res.output.startswith(f"error: {p}:") and "not valid YAML" in res.output


def test_truncated_safetensors_names_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    p = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(p))
    p.write_bytes(p.read_bytes()[:100])
    res = CliRunner().invoke(_raising_call(lambda: load_file(str(p))), [])
    assert res.exit_code == 2 and res.output.startswith(f"error: {p}: safetensors: "), res.output
    assert res.output.count("\n") == 1


def _raising_call(fn):
    @click.command()
    @friendly_errors
    def boom():
        fn()

    return boom


def test_keyboard_interrupt_and_debug():
    res = CliRunner().invoke(_raising(KeyboardInterrupt()), [])
    assert res.exit_code == 130 and "interrupted" in res.output
    res = CliRunner().invoke(_raising(ZeroDivisionError("x")), [], env={"DISTILL_DEBUG": "1"})
    assert res.exit_code == 1 and "Traceback" in res.output and "internal error: ZeroDivisionError" in res.output


def test_debug_flag_prints_the_traceback(recipe, captured):
    code, out = run("--debug", "train", recipe, "--lr", "-1")
    assert code == 2 and "Traceback" in out and "train.lr: expected a number in (0, 1]" in out
    code, out = run("train", recipe, "--lr", "-1")
    assert code == 2 and "Traceback" not in out


@pytest.mark.parametrize("args, option", [
    (["eval", "m", "--recipe", "r.yaml", "--batch-size", "0"], "--batch-size"),
    (["eval", "m", "--recipe", "r.yaml", "--limit", "-1"], "--limit"),
    (["eval", "m", "--recipe", "r.yaml", "--shots", "-1"], "--shots"),
    (["bench", "--recipe", "r.yaml", "--teacher", "t", "--student", "s", "--latency-examples", "0"],
     "--latency-examples"),
    (["serve-teacher", "t.yaml", "--port", "70000"], "--port"),
    (["train", "r.yaml", "--stop-after-steps", "0"], "--stop-after-steps"),
    (["generate", "r.yaml", "--k", "0"], "--k"),
])
def test_cli_only_options_have_ranges(args, option):
    code, out = run(*args)
    assert code == 2 and option in out and "Traceback" not in out


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned(tmp_path, monkeypatch, caplog, native):
    """bf16 autocast on a CPU that emulates bfloat16 made a training step 21x slower than float32
    (scripts/bench_step_variants.py): check_machine says so. Which instructions a CPU has cannot vary on one
    machine, so oneDNN's answer is replaced here, both ways; the real one is checked to be a bool."""
    import logging

    from distill.train import setup as train_setup

    assert isinstance(train_setup.cpu_has_native_bf16(), bool)
    monkeypatch.setattr(train_setup, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(train_setup.torch.cuda, "is_available", lambda: False)
    path = write(tmp_path / "r.yaml", {"name": "t", "workdir": str(tmp_path / "w"), "task": {"data": "builtin:default"},
                                       "train": {"mixed_precision": "bf16"}})
    with caplog.at_level(logging.WARNING, logger="distill.train.setup"):
        train_setup.check_machine(load_recipe(path))
    warned = [r.getMessage() for r in caplog.records if "bf16 on a CPU without bfloat16" in r.getMessage()]
    assert bool(warned) is not native
    if warned:
        assert warned[0].startswith(path + ": train.mixed_precision")
