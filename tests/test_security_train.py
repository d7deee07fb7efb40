"""Training that diverges or reads broken teacher numbers stops with one line naming the step, keeps the
last good checkpoint and never saves NaN weights (issue 35 item 4); the trainer's own step clock.

Real `distill train` runs through the CLI on a 1-layer tiny student. train.lr is bounded by the recipe
checks (at most 1), so `--lr 1e30` is refused at the door; a NaN loss is made by wrapping the task's
loss at one step (the only mock here: no bounded setting makes a tiny model diverge within a few steps).
"""
from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_llama, write_class_data, write_recipe
from safetensors.torch import load_file, save_file

from distill.cli import cli
from distill.errors import DistillError
from distill.train import loop
from distill.train.tasks import ClassificationTask


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    """A 1-layer student, data, and a recipe of 3 optimizer steps (6 training texts, batch 2) with a
    checkpoint after every step."""
    tmp = tmp_path_factory.mktemp("sectrain")
    student = make_tiny_llama(tmp / "student", smollm2_dir, layers=1)
    data = write_class_data(tmp / "d.jsonl")
    recipe = write_recipe(tmp / "r.yaml", data, tmp / "work", student, alpha=0.0, batch_size=2, train_examples=6,
                          eval_examples=3, checkpoint_every=1, keep_checkpoints=3, student={"model": student})
    return tmp, recipe


def train(*args):
    res = CliRunner().invoke(cli, ["train", *map(str, args)])
    return res, [ln for ln in res.output.splitlines() if ln.startswith("error:")]


def hashes(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def nan_from_call(monkeypatch, first: int, grad_only: bool = False):
    """Wrap ClassificationTask.loss_sums: from its `first`-th call on (1-based) the KD and CE sums are NaN, or
    (grad_only) stay finite while their gradient is NaN (sqrt at 0 times a zero derivative)."""
    real, calls = ClassificationTask.loss_sums, []

    def loss_sums(self, model, idx, kw):
        kd, ce = real(self, model, idx, kw)
        calls.append(1)
        if len(calls) < first:
            return kd, ce
        if grad_only:
            w = next(p for p in model.parameters() if p.requires_grad)
            return kd, ce + torch.sqrt((w - w).abs().sum())
        return kd * float("nan"), ce * float("nan")

    monkeypatch.setattr(ClassificationTask, "loss_sums", loss_sums)


def finite_file(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(setup, monkeypatch):
    tmp, recipe = setup
    out = tmp / "nan-loss"
    res, errors = train(recipe, "--out", out, "--stop-after-steps", 2)
    assert res.exit_code == 0, res.output
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002"]
    before = hashes(ckpts / "step-00000002")

    nan_from_call(monkeypatch, first=1)  # the resumed run's first micro-batch: optimizer step 3
    res, errors = train(recipe, "--out", out, "--resume")
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert "optimizer step 3 of 3" in errors[0] and "not finite" in errors[0], errors[0]
    assert "step-00000002" in errors[0]  # it names the checkpoint that was kept
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002"]
    assert hashes(ckpts / "step-00000002") == before  # compared by content
    assert finite_file(ckpts / "step-00000002" / "trainable.safetensors")
    assert not (out / "model.safetensors").exists() and not (out / "training.json").exists()

    monkeypatch.undo()  # the kept checkpoint resumes: the run finishes with finite weights and step times
    res, errors = train(recipe, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert finite_file(out / "model.safetensors")
    steps = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["step_seconds"] > 0 and r["step_cpu_seconds"] > 0 for r in steps)
    info = json.loads((out / "training.json").read_text())
    assert info["step_seconds_mean"] == pytest.approx(sum(r["step_seconds"] for r in steps) / 3, abs=1e-3)


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_optimizer_step(setup, monkeypatch):
    tmp, recipe = setup
    out = tmp / "nan-grad"
    nan_from_call(monkeypatch, first=2, grad_only=True)
    res, errors = train(recipe, "--out", out)
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and "optimizer step 2 of 3" in errors[0] and "gradient norm is nan" in errors[0], errors
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert finite_file(out / "checkpoints" / "step-00000001" / "trainable.safetensors")
    assert not (out / "model.safetensors").exists()


def test_a_nan_validation_loss_is_never_kept_as_the_best_model(setup, monkeypatch):
    """The first evaluation is always "the best so far": a NaN there must stop the run, not be saved."""
    tmp, recipe = setup
    out = tmp / "nan-eval"
    real = ClassificationTask.evaluate

    def evaluate(self, *args):  # the evaluation's figures made NaN (mock: finite weights give finite figures)
        return {**real(self, *args), "val_loss": float("nan")}

    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate)
    res, errors = train(recipe, "--out", out)
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and "optimizer step 3 of 3" in errors[0] and "validation loss is nan" in errors[0], errors
    assert not (out / "model.safetensors").exists() and not (out / "training.json").exists()


def test_weights_with_nan_are_never_saved():
    """check_weights guards every checkpoint and the best model; a Run-like record stands in for the run."""
    good = torch.zeros(3, requires_grad=True)
    run = types.SimpleNamespace(params=[good], world=1, cfg=types.SimpleNamespace(lr=1e-3))
    loop.check_weights(run, "checkpoint of optimizer step 4")  # finite: no error
    run.params = [good, torch.tensor([0.0, float("inf")])]
    with pytest.raises(DistillError, match="checkpoint of optimizer step 4: the weights hold non-finite"):
        loop.check_weights(run, "checkpoint of optimizer step 4")


def test_a_cache_with_nan_soft_labels_is_refused_not_trained_at_kd_zero(setup, tiny_model):
    """A soft-label cache whose shard holds NaN (its checksum rewritten to match, as a broken teacher's
    numbers cached by an older distill would be): training stops in one line and saves nothing."""
    tmp, recipe = setup
    import yaml

    r = yaml.safe_load(recipe.read_text())
    r.update(teacher=tiny_model, workdir=str(tmp / "work-nan-cache"))
    r["train"]["alpha"] = 0.5
    p = tmp / "kd.yaml"
    p.write_text(yaml.safe_dump(r))
    gen = CliRunner().invoke(cli, ["generate", str(p), "--backend", "transformers"])
    assert gen.exit_code == 0, gen.output
    cache = tmp / "work-nan-cache" / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["split"] == "train")
    shard = cache / entry["file"]
    tensors = load_file(str(shard))
    tensors["label_logprobs"][:, 0] = float("nan")
    save_file(tensors, str(shard))
    entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(manifest))

    out = tmp / "nan-cache"
    res, errors = train(p, "--out", out)
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert "nan" in errors[0].lower() and str(cache) in errors[0], errors[0]
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()
