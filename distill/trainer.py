"""`distill train`: an Accelerate loop minimising alpha * T^2 * KD(teacher_T || student_T) + (1 - alpha) * CE.

The teacher is never in memory: its distributions come from the cache written by `distill generate`.
alpha = 0 with no cache is plain supervised fine-tuning (how the default job fine-tunes its teacher).
The batch size is global: each process takes its share of every batch, so a run means the same at any
world size. Only the main process logs and saves.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import cache as cache_mod
from .config import Recipe, resolve_teacher
from .data import prepare_splits
from .errors import UsageError
from .evaluation import classification_metrics, predict_scores
from .io import atomic_write_bytes, atomic_write_text
from .losses import soft_label_kd, sparse_kd
from .models import load_tokenizer, resolve_model_path, tokenizer_hash
from .prompts import encode_classification
from .student import add_lora, build_student, count_parameters, save_model

log = logging.getLogger(__name__)


def check_cache(manifest: cache_mod.Manifest, cache_dir, tok, model, splits) -> None:
    """Refuse a cache made for other data, another tokenizer, or token ids the student cannot emit."""
    if manifest.data_fingerprint != splits.fingerprint:
        raise UsageError(f"{cache_dir}: made for other data (fingerprint {manifest.data_fingerprint}, "
                         f"this recipe's data is {splits.fingerprint}); run `distill generate` again")
    if manifest.tokenizer_hash != tokenizer_hash(tok):
        raise UsageError(f"{cache_dir}: made with a different tokenizer (hash {manifest.tokenizer_hash}, the "
                         f"student's is {tokenizer_hash(tok)}); teacher and student must share a tokenizer")
    if manifest.labels != splits.labels:
        raise UsageError(f"{cache_dir}: made for another label set")
    rows = model.get_input_embeddings().weight.shape[0]
    if manifest.kind == "topk" and rows < len(tok):
        raise UsageError(f"{cache_dir}: the student has {rows} embedding rows, fewer than the {len(tok)} tokens of the tokenizer")


def _schedule(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _plot(history: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "loss" in h]
    epochs = [h for h in history if "val_f1" in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "kd", "ce"):
        if steps and key in steps[0]:
            a.plot([h["step"] for h in steps], [h[key] for h in steps], label=key)
    a.set_xlabel("optimizer step")
    a.set_title("training loss terms")
    a.legend()
    if epochs:
        b.plot([h["epoch"] for h in epochs], [h["train_f1"] for h in epochs], "o-", label="train macro-F1")
        b.plot([h["epoch"] for h in epochs], [h["val_f1"] for h in epochs], "o-", label="validation macro-F1")
        b.set_xlabel("epoch")
        b.set_ylim(0, 1.02)
        b.set_title("train vs validation (watch the gap)")
        b.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def run_train(recipe: Recipe, cache: str | None = None, out: str | None = None, init_from: str | None = None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = recipe.train
    task = recipe.task
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UsageError(f"{recipe.path}: train.alpha: expected a number in [0, 1], got {cfg.alpha}")
    if task.type != "classification":
        raise UsageError(f"{recipe.path}: task.type: training generation tasks is not available yet; use classification")
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed)
    splits = prepare_splits(task, recipe.workdir, recipe.path or "recipe")
    labels = splits.labels
    src = init_from or recipe.teacher
    base_path = resolve_model_path(resolve_teacher(src).source)
    tok = load_tokenizer(cfg.student.model and resolve_model_path(cfg.student.model) or base_path)
    model = build_student(cfg.student, base_path)
    n_params = count_parameters(model)
    if cfg.lora:
        model = add_lora(model, cfg.lora)

    train_ex = splits.train[: cfg.train_examples] if cfg.train_examples else splits.train
    val_ex = splits.validation[: cfg.eval_examples] if cfg.eval_examples else splits.validation
    enc_train, label_ids = encode_classification(tok, task, labels, train_ex, cfg.max_length)
    enc_val, _ = encode_classification(tok, task, labels, val_ex, cfg.max_length)
    gold = torch.tensor([e.label_index for e in enc_train])

    teacher_train = teacher_val = None
    cache_dir = Path(cache or recipe.workdir_path / "cache")
    if cfg.alpha > 0:
        manifest = cache_mod.read_manifest(cache_dir)
        check_cache(manifest, cache_dir, tok, model, splits)
        teacher_train = cache_mod.load_split(cache_dir, "train", len(splits.train))["label_logprobs"][: len(train_ex)]
        if manifest.complete.get("validation"):
            teacher_val = cache_mod.load_split(cache_dir, "validation", len(splits.validation))["label_logprobs"][: len(val_ex)]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise UsageError(f"{recipe.path}: train.batch_size={cfg.batch_size} must divide evenly over {world} processes")
    per_epoch = math.ceil(len(enc_train) / cfg.batch_size)
    total_batches = max(1, int(round(cfg.epochs * per_epoch)))
    total_steps = math.ceil(total_batches / cfg.grad_accum)
    scheduler = _schedule(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)

    out_dir = Path(out or recipe.workdir_path / "student")
    history, best, t0 = [], None, time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    bar = tqdm(total=total_batches, desc="train", unit="batch", disable=not acc.is_main_process)
    step = 0
    for b in range(total_batches):
        if not order:
            order = torch.randperm(len(enc_train), generator=gen).tolist()
        idx = order[: cfg.batch_size][rank::world]
        order = order[cfg.batch_size:]
        model.train()
        with acc.accumulate(model):
            scores = label_logprobs_batch(model, enc_train, idx, label_ids, tok.pad_token_id)
            ce = F.cross_entropy(scores.float(), gold[idx].to(scores.device))
            kd = soft_label_kd(scores, teacher_train[idx].to(scores.device), cfg.temperature) if teacher_train is not None else torch.zeros((), device=scores.device)
            loss = cfg.alpha * cfg.temperature ** 2 * kd + (1 - cfg.alpha) * ce
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if acc.sync_gradients:
            step += 1
            rec = {"step": step, "loss": loss.item(), "kd": kd.item(), "ce": ce.item(), "lr": scheduler.get_last_lr()[0]}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{rec['kd']:.3f}", ce=f"{rec['ce']:.3f}")
        bar.update(1)
        if (b + 1) % per_epoch == 0 or b + 1 == total_batches:
            epoch = (b + 1) / per_epoch
            ev = _evaluate_epoch(acc, model, enc_train, enc_val, label_ids, tok.pad_token_id, labels, teacher_val, cfg)
            ev["epoch"] = round(epoch, 3)
            ev["elapsed_s"] = round(time.time() - t0, 1)
            history.append(ev)
            if acc.is_main_process:
                log.info("epoch %.2f: val macro-F1 %.4f, train macro-F1 %.4f, val CE %.4f%s", epoch, ev["val_f1"],
                         ev["train_f1"], ev["val_ce"], f", val KD {ev['val_kd']:.4f}" if "val_kd" in ev else "")
                if ev["train_val_gap"] > cfg.overfit_gap:
                    log.warning("train macro-F1 exceeds validation by %.3f: the student may be overfitting", ev["train_val_gap"])
            if best is None or (ev["val_f1"], -ev["val_ce"]) > (best["val_f1"], -best["val_ce"]):
                best = ev
                if acc.is_main_process:
                    save_model(acc.unwrap_model(model), tok, out_dir, merge=cfg.lora.merge if cfg.lora else True)
            acc.wait_for_everyone()
    bar.close()
    if acc.is_main_process:
        summary = {"recipe": recipe.path, "alpha": cfg.alpha, "temperature": cfg.temperature, "base": base_path,
                   "layers": acc.unwrap_model(model).config.num_hidden_layers, "parameters": n_params,
                   "train_examples": len(enc_train), "validation_examples": len(enc_val), "best": best,
                   "overfit_gap": cfg.overfit_gap, "seconds": round(time.time() - t0, 1), "world_size": world,
                   "cache": str(cache_dir) if cfg.alpha > 0 else None}
        atomic_write_text(out_dir / "training.json", json.dumps(summary, indent=1))
        atomic_write_text(out_dir / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        _plot(history, out_dir / "training.png")
    acc.wait_for_everyone()
    return out_dir


def label_logprobs_batch(model, encoded, idx, label_ids, pad_id):
    from .scoring import label_logprobs

    return label_logprobs(model, [encoded[i].prompt for i in idx], label_ids, pad_id)


def _evaluate_epoch(acc, model, enc_train, enc_val, label_ids, pad_id, labels, teacher_val, cfg) -> dict:
    """Validation CE/KD/F1 and the F1 on as many training examples, to expose a train-validation gap."""
    m = acc.unwrap_model(model)
    val_scores = predict_scores(m, enc_val, label_ids, pad_id, cfg.batch_size)
    val_gold = torch.tensor([e.label_index for e in enc_val])
    tr = enc_train[: len(enc_val)]
    tr_scores = predict_scores(m, tr, label_ids, pad_id, cfg.batch_size)
    val_f1 = classification_metrics(val_gold.tolist(), val_scores.argmax(1).tolist(), labels)["macro_f1"]
    tr_f1 = classification_metrics([e.label_index for e in tr], tr_scores.argmax(1).tolist(), labels)["macro_f1"]
    ev = {"val_f1": val_f1, "train_f1": tr_f1, "train_val_gap": tr_f1 - val_f1,
          "val_ce": F.cross_entropy(val_scores, val_gold).item()}
    if teacher_val is not None:
        ev["val_kd"] = soft_label_kd(val_scores, teacher_val, cfg.temperature).item()
    return ev
