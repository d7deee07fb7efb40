"""Leakage: texts shared by the holdout (or an evaluated file) and the training split are counted,
exactly and after normalising case and whitespace, and reported by generate and eval; the training
file itself as the holdout or as `eval --data` is refused; each eval split keeps its own report."""
import json
import logging
import shutil

import pytest
import yaml
from click.testing import CliRunner
from conftest import CLASS_ROWS, write_class_data, write_recipe

from distill.cli import cli
from distill.config import TaskConfig
from distill.data.leakage import normalize_text, overlap, split_overlaps
from distill.data.splits import prepare_splits, same_file
from distill.errors import UsageError


def test_overlap_counts_exact_and_normalised_texts():
    train = [{"text": "where is my parcel"}, {"text": "I cannot log in"}, {"text": "the invoice total is wrong"}]
    other = [{"text": "Where is my PARCEL  "}, {"text": "I cannot log in"}, {"text": "\tI  CANNOT log in\n"},
             {"text": "a text of its own"}]
    r = overlap(train, other, "text", "train.jsonl", "test.jsonl")
    assert (r.total, r.exact, r.normalized) == (4, 1, 3)
    assert r.examples == ["Where is my PARCEL  ", "I cannot log in", "\tI  CANNOT log in\n"]
    assert "test.jsonl: 3 of 4 texts also occur in train.jsonl (1 exact, 2 more" in r.message()
    assert not overlap(train, [{"text": "where is my parcel?"}])  # punctuation is not normalised away
    assert overlap(["ﬁle Ａ"], ["FILE A"]).normalized == 1  # NFKC: the ligature and the full-width letter
    assert normalize_text("  Where\u00a0is my PARCEL  ") == "where is my parcel"
    assert overlap(train, ["WHERE IS MY PARCEL"], max_examples=0).examples == []


def test_same_file_by_path_or_bytes(tmp_path):
    a = write_class_data(tmp_path / "a.jsonl")
    b = tmp_path / "b.jsonl"
    shutil.copy(a, b)
    c = tmp_path / "c.jsonl"
    c.write_text(a.read_text() + "\n")
    assert same_file(a, tmp_path / "." / "a.jsonl") and same_file(a, b) and not same_file(a, c)
    assert same_file("builtin:default", "builtin:default") and not same_file("builtin:default", a)
    assert not same_file(a, tmp_path / "missing.jsonl")


def test_split_overlaps_of_a_recipe_and_its_holdout_file(tmp_path):
    data = write_class_data(tmp_path / "d.jsonl")
    test = tmp_path / "t.jsonl"
    test.write_text("".join(json.dumps({"text": t.upper() + "  ", "label": lab}) + "\n" for t, lab in CLASS_ROWS))
    task = TaskConfig(data=str(data), holdout_data=str(test), labels=["billing", "delivery", "login"])
    splits = prepare_splits(task, tmp_path / "w")
    val, hold_train, hold_val = split_overlaps(task, splits)
    assert val.normalized == 0 and not val
    assert hold_train.other_name == f"task.holdout_data {test}" and hold_train.total == len(CLASS_ROWS)
    in_train = {normalize_text(e["text"]) for e in splits.train}
    assert hold_train.normalized == sum(normalize_text(t) in in_train for t, _ in CLASS_ROWS) > 0
    assert hold_train.exact == 0
    assert hold_train.normalized + hold_val.normalized == len(CLASS_ROWS)  # every first copy is in train or validation


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    """A recipe whose official holdout file repeats some training texts in capitals."""
    tmp = tmp_path_factory.mktemp("leak")
    data = write_class_data(tmp / "d.jsonl", copies=2)
    test = tmp / "t.jsonl"
    test.write_text("".join(json.dumps({"text": t.upper() + "  ", "label": lab}) + "\n" for t, lab in CLASS_ROWS[:6])
                    + json.dumps({"text": "a message of its own", "label": "login"}) + "\n")
    recipe = write_recipe(tmp / "r.yaml", data, tmp / "w", tiny_model)
    r = yaml.safe_load(recipe.read_text())
    r["task"]["holdout_data"] = str(test)
    recipe.write_text(yaml.safe_dump(r))
    return {"tmp": tmp, "data": data, "test": test, "recipe": recipe, "model": tiny_model}


def variant(env, name, **task):
    r = yaml.safe_load(env["recipe"].read_text())
    r["workdir"] = str(env["tmp"] / f"w-{name}")
    r["task"].update(task)
    out = env["tmp"] / f"{name}.yaml"
    out.write_text(yaml.safe_dump(r))
    return str(out)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def leak_warnings(caplog) -> list[str]:
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [m for m in msgs if "also occur in" in m]


def assert_one_line(res, code, expected):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_generate_warns_of_holdout_texts_in_the_training_split(env, caplog):
    caplog.set_level(logging.WARNING)
    res = invoke("generate", env["recipe"], "--backend", "transformers")
    assert res.exit_code == 0, res.output
    (msg,) = [m for m in leak_warnings(caplog) if "in the training split" in m]
    train = [json.loads(ln) for ln in (env["tmp"] / "w" / "data" / "train.jsonl").read_text().splitlines()]
    n = sum(normalize_text(t) in {normalize_text(e["text"]) for e in train} for t, _ in CLASS_ROWS[:6])
    assert msg.startswith(f"task.holdout_data {env['test']}: {n} of 7 texts also occur in the training split of "
                          f"{env['data']} (0 exact, {n} more after normalising case and whitespace)")


def test_eval_warns_and_each_split_keeps_its_own_report(env, caplog):
    caplog.set_level(logging.WARNING)
    res = invoke("eval", env["model"], "--recipe", env["recipe"])
    assert res.exit_code == 0, res.output
    assert any(m.startswith(f"task.holdout_data {env['test']}: ") for m in leak_warnings(caplog))
    holdout = env["tmp"] / "w" / "eval" / "model" / "report.json"
    before = holdout.read_bytes()
    assert json.loads(before)["n"] == 7
    for args, name in ((["--split", "train"], "model-train"), (["--split", "validation", "--limit", "3"],
                                                                "model-validation-limit3"),
                       (["--shots", "2"], "model-2shot"), (["--limit", "4"], "model-limit4")):
        res = invoke("eval", env["model"], "--recipe", env["recipe"], *args)
        assert res.exit_code == 0, res.output
        assert (env["tmp"] / "w" / "eval" / name / "report.json").is_file(), name
    assert holdout.read_bytes() == before
    caplog.clear()
    other = env["tmp"] / "other.jsonl"
    other.write_text(json.dumps({"text": "MY CARD WAS CHARGED TWICE", "label": "billing"}) + "\n")
    res = invoke("eval", env["model"], "--recipe", env["recipe"], "--data", other)
    assert res.exit_code == 0, res.output
    assert (env["tmp"] / "w" / "eval" / "model-other" / "report.json").is_file()
    assert holdout.read_bytes() == before
    assert leak_warnings(caplog)[0].startswith(f"--data {other}: 1 of 1 texts also occur in the training split")


def test_the_training_file_is_refused_as_holdout_and_as_eval_data(env):
    copy = env["tmp"] / "copy_of_d.jsonl"
    shutil.copy(env["data"], copy)
    for i, same in enumerate((env["data"], env["tmp"] / "." / "d.jsonl", copy)):
        res = invoke("generate", variant(env, f"same{i}", holdout_data=str(same)), "--backend", "transformers")
        assert_one_line(res, 2, f"task.holdout_data: {same} is the training data")
        assert not (env["tmp"] / f"w-same{i}" / "cache").exists()
        res = invoke("eval", env["model"], "--recipe", env["recipe"], "--data", same)
        assert_one_line(res, 2, f"--data {same}: this is the recipe's training data (task.data in {env['recipe']})")
    split_file = env["tmp"] / "w" / "data" / "train.jsonl"  # the training split that generate wrote
    res = invoke("eval", env["model"], "--recipe", env["recipe"], "--data", split_file)
    assert_one_line(res, 2, f"--data {split_file}: this is the recipe's training data")
    with pytest.raises(UsageError, match="is the training data"):
        prepare_splits(TaskConfig(data="builtin:default", holdout_data="builtin:default"), env["tmp"] / "b")


def test_an_empty_split_to_evaluate_is_one_line(env):
    no_holdout = variant(env, "noholdout", holdout_data=None, split={"validation": 0.2, "holdout": 0.0, "seed": 0})
    res = invoke("eval", env["model"], "--recipe", no_holdout)
    assert_one_line(res, 2, f"{no_holdout}: the holdout split is empty: set task.split.holdout or task.holdout_data")
    no_val = variant(env, "noval", split={"validation": 0.0, "holdout": 0.2, "seed": 0})
    res = invoke("eval", env["model"], "--recipe", no_val, "--split", "validation")
    assert_one_line(res, 2, f"{no_val}: the validation split is empty: set task.split.validation")


def test_doctor_reports_overlaps_as_warnings(tmp_path, tiny_model):
    """distill doctor shows one overlap row per pair of splits; a holdout text that is a training text
    after normalising case and whitespace is a warning, not a failure."""
    from distill.doctor import WARN, check_recipe

    rows = [{"text": t, "label": lab} for t, lab in CLASS_ROWS] * 1
    rows += [{"text": f"message number {i}", "label": CLASS_ROWS[i % len(CLASS_ROWS)][1]} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    holdout = tmp_path / "official.jsonl"
    holdout.write_text(json.dumps({"text": "  MY CARD was charged   twice ", "label": "billing"}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", tiny_model)
    import yaml

    r = yaml.safe_load(recipe.read_text())
    r["task"]["holdout_data"] = str(holdout)
    recipe.write_text(yaml.safe_dump(r))
    out, _, splits = check_recipe(str(recipe))
    rows = [(status, msg) for name, status, msg in out if name == "overlap"]
    assert len(rows) == 3, rows  # validation vs train, holdout vs train, holdout vs validation
    in_train = normalize_text("my card was charged twice") in {normalize_text(e["text"]) for e in splits.train}
    official = rows[1]
    assert "official.jsonl" in official[1]
    assert (official[0] == WARN and "1 of 1" in official[1]) if in_train else official[0] != WARN, official
