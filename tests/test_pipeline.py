"""generate -> train -> eval through the real CLI on a tiny model, F1 against scikit-learn,
overfitting two examples, and bad input stopped with a clear message and exit status."""
import json
import subprocess
import sys

import pytest
from conftest import make_tiny_llama, write_class_data, write_recipe
from sklearn.metrics import f1_score, precision_recall_fscore_support


def distill(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "distill", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("pipe")
    data = write_class_data(tmp / "d.jsonl")
    recipe = write_recipe(tmp / "r.yaml", data, tmp / "work", tiny_model, student={"num_layers": 1})
    gen = distill("generate", recipe, "--backend", "transformers")
    assert gen.returncode == 0, gen.stderr[-3000:]
    tr = distill("train", recipe)
    assert tr.returncode == 0, tr.stderr[-3000:]
    ev = distill("eval", tmp / "work" / "student", "--recipe", recipe)
    assert ev.returncode == 0, ev.stderr[-3000:]
    return tmp, recipe, ev.stdout


def test_pipeline_writes_every_artifact(pipeline):
    tmp, _, out = pipeline
    w = tmp / "work"
    assert (w / "cache" / "manifest.json").is_file()
    man = json.loads((w / "cache" / "manifest.json").read_text())
    assert man["kind"] == "soft_labels" and man["complete"] == {"train": True, "validation": True}
    for k in ("teacher", "tokenizer_hash", "vocab_size", "data_fingerprint", "backend", "versions"):
        assert man[k]
    assert (w / "student" / "config.json").is_file() and (w / "student" / "training.png").is_file()
    info = json.loads((w / "student" / "training.json").read_text())
    assert info["layers"] == 1 and info["alpha"] == 0.5
    log = [json.loads(x) for x in (w / "student" / "train_log.jsonl").read_text().splitlines()]
    assert all("kd" in r and "ce" in r for r in log if "loss" in r)  # both terms logged separately
    assert any(r["kd"] > 0 for r in log if "loss" in r)
    for f in ("report.json", "confusion.png", "confusion.csv", "predictions.jsonl"):
        assert (w / "eval" / "student" / f).is_file()
    assert "macro-F1" in out


def test_reported_f1_equals_scikit_learn(pipeline):
    tmp, _, _ = pipeline
    d = tmp / "work" / "eval" / "student"
    report = json.loads((d / "report.json").read_text())
    preds = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
    labels = list(report["per_class"])
    y_true = [labels.index(p["label"]) for p in preds]
    y_pred = [labels.index(p["predicted"]) for p in preds]
    assert report["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", labels=range(3), zero_division=0))
    assert report["weighted_f1"] == pytest.approx(
        f1_score(y_true, y_pred, average="weighted", labels=range(3), zero_division=0))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(3), zero_division=0)
    for i, lab in enumerate(labels):
        assert report["per_class"][lab]["f1"] == pytest.approx(f[i])
        assert report["per_class"][lab]["support"] == s[i]
    assert sum(map(sum, report["confusion"])) == len(preds)


def test_two_examples_can_be_overfit(tmp_path, smollm2_dir):
    model = make_tiny_llama(tmp_path / "m", smollm2_dir, layers=2, seed=1)
    data = write_class_data(tmp_path / "d.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", model, alpha=0.0, epochs=40, lr=3e-3,
                          batch_size=2, train_examples=2, eval_examples=4, warmup_ratio=0.0)
    from distill.config import load_recipe
    from distill.train import run_train

    out = run_train(load_recipe(recipe))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps[0]["ce"] > 0.5
    assert steps[-1]["ce"] < 0.05
    from distill.data.sampling import subset_indices

    train = [json.loads(x) for x in (tmp_path / "w" / "data" / "train.jsonl").read_text().splitlines()]
    gold = [train[i]["label"] for i in subset_indices(train, 2, seed=0)]  # the stratified labelled subset
    perfect = f1_score(gold, gold, average="macro", labels=["billing", "delivery", "login"], zero_division=0)
    assert [r for r in log if "train_f1" in r][-1]["train_f1"] == pytest.approx(perfect)


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, tiny_model, smollm2_dir, pipeline):
    r = distill("train", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "missing.yaml: no such file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  alhpa: 0.5\n")
    r = distill("generate", bad)
    assert r.returncode == 2 and "unknown key 'train.alhpa'" in r.stderr and "did you mean 'train.alpha'" in r.stderr
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok", "label": "billing"}\n{"text": "bad", "label": "weather"}\n')
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", tiny_model)
    r = distill("generate", recipe)
    assert r.returncode == 2 and "d.jsonl:2: label 'weather' is not in the label set" in r.stderr
    # a cache made for other data (another split seed) is refused by train, before anything is written
    tmp, good_recipe, _ = pipeline
    r = distill("train", good_recipe, "--set", f"workdir={tmp_path / 'w2'}", "--set", "task.split.seed=1",
                "--cache", tmp / "work" / "cache", "--out", tmp_path / "never")
    assert r.returncode == 2 and "made for other data" in r.stderr
    assert not (tmp_path / "never").exists()
