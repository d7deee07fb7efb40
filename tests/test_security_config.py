"""Hostile and careless recipes (issue 35, config level) through the real CLI, and the typed hand-offs of
training (issue 31): `Run` by keyword, the Task, ExampleStream and TeacherBackend protocols.

Every bad recipe must end with exit status 2, exactly one short error line, no traceback, and every file
that was there before unchanged (compared by hash) with no new one. No model is loaded: each case is
refused while the recipe is read.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
from click.testing import CliRunner
from test_bad_input import error_lines, snapshot

from distill.cli import cli

BOMB_LEVELS = 9  # 10 ** 9 values once expanded, in a few hundred bytes


def alias_bomb(key: str) -> str:
    """A billion-laughs YAML: each anchor a list of ten aliases of the one before, `key` the last one."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, BOMB_LEVELS + 1)]
    return "\n".join(lines) + f"\n{key}: *a{BOMB_LEVELS}\n"


def flow_bomb(levels: int = 8) -> str:
    """The same in one line of flow YAML (a --set value): [&x0 [lol, ...], &x1 [*x0, ...], ...]."""
    lists = ["&x0 [" + ", ".join(["lol"] * 10) + "]"]
    lists += [f"&x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(lists) + "]"


BASE = "workdir: WORK\ntask:\n  data: builtin:default\n"
EXTENDS = "extends: base.yaml\n"

# (case id, the recipe's text (it extends base.yaml), extra arguments, a part of the expected error line[, base.yaml])
CASES = [
    ("duplicate top-level key", "name: a\nname: b\n" + EXTENDS, [], "r.yaml:2: duplicate key 'name' (first on line 1)"),
    ("duplicate nested key", EXTENDS + "train:\n  lr: 0.001\n  epochs: 1\n  lr: 0.1\n", [],
     "r.yaml:5: duplicate key 'lr' (first on line 3)"),
    ("duplicate key in a parent", EXTENDS, [], "base.yaml:4: duplicate key 'workdir' (first on line 1)",
     BASE + "workdir: elsewhere\n"),
    ("alias bomb", EXTENDS + alias_bomb("bomb"), [], "values once its aliases are expanded"),
    ("alias bomb under a real key", EXTENDS + alias_bomb("task"), [],
     "values once its aliases are expanded"),
    ("nested 10,000 deep", EXTENDS + "name: " + "[" * 10_000 + "]" * 10_000 + "\n", [], "nested deeper than 64 levels"),
    ("nested deep by aliases", EXTENDS + "".join(f"{k}: {'&' + k if k != 'c' else ''} {'[' * 30}{v}{']' * 30}\n"
                                                 for k, v in (("a", "1"), ("b", "*a"), ("c", "*b"))), [],
     "nested deeper than 64 levels once its aliases are expanded"),
    ("an alias inside itself", EXTENDS + "task:\n  labels: &a [x, *a]\n", [], "nested deeper than 64 levels"),
    ("temperature 1e-30", EXTENDS + "train:\n  temperature: 1.0e-30\n", [],
     "train.temperature: expected at least 0.05, got 1e-30"),
    ("--temperature 0.001", EXTENDS, ["--temperature", "0.001"], "--temperature: train.temperature: expected at least"),
    ("on-policy temperature 1e-9", EXTENDS + "train:\n  on_policy:\n    temperature: 1.0e-9\n", [],
     "train.on_policy.temperature: expected 0 or at least 0.05"),
    ("--lr 1e30", EXTENDS, ["--lr", "1e30"], "--lr: train.lr: expected a number in (0, 1], got 1e+30"),
    ("train.lr 1e30", EXTENDS + "train:\n  lr: 1.0e+30\n", [], "train.lr: expected a number in (0, 1]"),
    ("name climbing out", EXTENDS + "name: ../../escaped\n", [], "name: expected a name without path separators"),
    ("name with a slash", EXTENDS + "name: runs/a\n", [], "name: expected a name without path separators"),
    ("name '..'", EXTENDS + "name: '..'\n", [], "name: expected a name without path separators"),
    ("name with a newline", EXTENDS + 'name: "a\\nb"\n', [], "name: expected a name without path separators"),
    ("--set name=../x", EXTENDS, ["--set", "name=../x"], "--set name=../x: name: expected a name without"),
    ("--set seed past 2**32", EXTENDS, ["--set", "train.seed=4294967296"],
     "train.seed: expected a number in [0, 4294967295], got 4294967296"),
    ("--seed past 2**32", EXTENDS, ["--seed", "4294967296"], "--seed"),
    ("generate.seed negative", EXTENDS + "generate:\n  seed: -1\n", [], "generate.seed: expected a number in [0,"),
    ("split seed past 2**32", EXTENDS + "task:\n  split:\n    seed: 99999999999\n", [], "task.split.seed: expected"),
    ("--set with a duplicate key", EXTENDS, ["--set", "train.lora={r: 4, r: 8}"], "duplicate key 'r'"),
    ("--set alias bomb", EXTENDS, ["--set", f"task.labels={flow_bomb()}"], "values once its aliases are expanded"),
    ("--set nested deep", EXTENDS, ["--set", "task.labels=" + "[" * 5000 + "]" * 5000], "nested deeper than 64"),
    ("empty recipe", "# only a comment\n", [], "the recipe is empty"),
    ("a recipe of 2 MB", EXTENDS + "instruction: '" + "x" * (2 << 20) + "'\n", [], "a recipe is at most"),
    ("QLoRA without LoRA", EXTENDS + "train:\n  student:\n    quantization: 4bit\n", [], "QLoRA needs train.lora"),
]

def cases():
    for case in CASES:
        text, extra, expected, base = (*case[1:], BASE)[:4]
        yield pytest.param(text, extra, expected, base, id=case[0])


@pytest.mark.parametrize("text, extra, expected, base", list(cases()))
def test_a_bad_recipe_is_one_line_and_changes_nothing(tmp_path, text, extra, expected, base):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("a file of the user's")
    (tmp_path / "base.yaml").write_text(base.replace("WORK", str(work)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    before = snapshot(tmp_path)
    res = CliRunner().invoke(cli, ["train", str(recipe), "--out", str(tmp_path / "out"), *extra])
    lines = error_lines(res.output)
    assert res.exit_code == 2, res.output[-2000:]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output[-2000:]
    assert expected in lines[0] and len(lines[0]) < 400, lines[0][:2000]
    assert snapshot(tmp_path) == before  # nothing changed, nothing new (no --out, no workdir files)


def test_doctor_reports_a_bad_recipe_in_one_line(tmp_path):
    """doctor reads the same recipe through the same loader: one FAIL row naming the duplicate key."""
    (tmp_path / "r.yaml").write_text(BASE.replace("WORK", str(tmp_path / "w")) + "name: a\nname: b\n")
    before = snapshot(tmp_path)
    res = CliRunner().invoke(cli, ["doctor", "--recipe", str(tmp_path / "r.yaml"), "--no-estimate"])
    assert res.exit_code in (1, 2) and "Traceback" not in res.output
    assert [ln for ln in error_lines(res.output) if "duplicate key 'name'" in ln], res.output
    assert snapshot(tmp_path) == before


def test_merge_keys_and_plain_anchors_still_load(tmp_path):
    """The limits refuse bombs and duplicates, not YAML's ordinary sharing: `<<:` overridden by a key of its own."""
    from distill.config import load_recipe

    (tmp_path / "r.yaml").write_text(
        "name: shared\nworkdir: w\ntask:\n  data: builtin:default\n"
        "generate: &g {batch_size: 4, seed: 3}\ntrain:\n  on_policy:\n    max_new_tokens: 8\n"
        "  lora:\n    <<: {r: 4, alpha: 8}\n    r: 8\n")
    r = load_recipe(tmp_path / "r.yaml")
    assert (r.generate.batch_size, r.generate.seed, r.train.lora.r, r.train.lora.alpha) == (4, 3, 8, 8)


# --- typed hand-offs -----------------------------------------------------------------------------


def test_run_is_built_by_keyword_with_names_that_say_what_they_are():
    from distill.train.setup import Parts, Run

    for cls in (Run, Parts):
        fields = dataclasses.fields(cls)
        with pytest.raises(TypeError):
            cls(*[None] * len(fields))  # positional: refused
        cls(**{f.name: None for f in fields})  # by keyword: built
        assert not {"kw", "ds", "acc"} & {f.name for f in fields}
        assert all("object" not in str(f.type) for f in fields), [(f.name, f.type) for f in fields]
    assert {"accelerator", "divergence_params"} <= {f.name for f in dataclasses.fields(Run)}
    assert isinstance(Run.deepspeed, property) and not hasattr(Run, "ds")


def _positional(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]


def _conforms(cls, protocol) -> list[str]:
    """What `cls` lacks of `protocol`'s methods, or takes with another number of positional arguments."""
    problems = []
    for name in [n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")]:
        mine = getattr(cls, name, None)
        if mine is None:
            problems.append(f"{cls.__name__} has no {name}")
        elif len(_positional(mine)) != len(_positional(getattr(protocol, name))):
            problems.append(f"{cls.__name__}.{name}{inspect.signature(mine)}")
    return problems


def test_teacher_backends_and_tasks_follow_their_protocols():
    from distill.teacher.backend import TeacherBackend
    from distill.teacher.hf import HFTeacher
    from distill.teacher.remote import ServerTeacher
    from distill.teacher.vllm_engine import VLLMTeacher
    from distill.train.tasks import ClassificationTask, GenerationTask, Task

    problems = [p for cls in (HFTeacher, VLLMTeacher, ServerTeacher) for p in _conforms(cls, TeacherBackend)]
    problems += [p for cls in (ClassificationTask, GenerationTask) for p in _conforms(cls, Task)]
    assert not problems
    assert {HFTeacher.name, VLLMTeacher.name, ServerTeacher.name} == {"transformers", "vllm", "server"}

    class NoEvaluate:  # a task the loop could not score: not a Task
        kind, train, val = "topk", [], []

        def count(self, idx):
            return len(idx)

        def loss_sums(self, model, idx, divergence_params):
            return 0, 0

    assert not isinstance(NoEvaluate(), Task)
    NoEvaluate.evaluate = lambda self, model, rank, world, divergence_params: {}
    assert isinstance(NoEvaluate(), Task)


def test_example_streams_pick_their_own_order_and_lists_a_permutation():
    import torch

    from distill.cache.store import TopkExample
    from distill.train.data import ExampleStream, InMemory, ShardOrder, TopkStream, data_order
    from distill.train.state import DataOrder

    assert issubclass(InMemory, ExampleStream) and issubclass(TopkStream, ExampleStream)
    assert not isinstance([1, 2, 3], ExampleStream)  # a list has len, [i] and count, but no order of its own
    ex = [TopkExample(torch.arange(4), torch.tensor([2, 3]), None, None, None) for _ in range(6)]
    stream = InMemory(ex, shard_size=2)
    assert isinstance(stream, ExampleStream)
    assert type(data_order(stream, 2, 0, 0, 1)) is ShardOrder
    assert type(data_order(list(ex), 2, 0, 0, 1)) is DataOrder
    with pytest.raises(Exception, match="group_by_length"):
        data_order(stream, 2, 0, 0, 1, group_by_length=True)
