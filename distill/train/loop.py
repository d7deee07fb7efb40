"""The training loop: set up, restore or start, then micro-batches until the last step, then the summary.

Multi-process (`accelerate launch`, DDP or DeepSpeed ZeRO-2/3): `train.batch_size` is the global
batch. Every process draws the same shuffled order and takes its share of each batch
(`batch[rank::world]`); the loss of a share is its sum divided by the size of the whole batch
(examples, or target tokens for generation) times the world size, so the averaged gradient and the
logged loss are those of the whole batch at any world size. Only rank 0 logs, writes files and
saves the model; collective steps (DeepSpeed checkpoints, ZeRO-3 weight gathering, sharded
evaluation) run on every rank.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from distill.config import Recipe
from distill.errors import DistillError, redact
from distill.models.loading import count_parameters
from distill.student.build import dense_lora_copy, save_model
from distill.train.checkpoint import list_checkpoints, remove_partial, set_rng_state
from distill.train.distributed import all_reduce_sum, barrier, zero_stage
from distill.train.losses import total_loss
from distill.train.onpolicy import OnPolicy, make_onpolicy
from distill.train.reporting import SwampWatch, better, log_evaluation, step_record, write_run_files
from distill.train.setup import Run, setup
from distill.train.state import LoopState

log = logging.getLogger(__name__)


def run_train(recipe: Recipe, cache: str | None = None, out: str | None = None, init_from: str | None = None,
              resume: bool = False, stop_after_steps: int | None = None, teacher_urls: list[str] | None = None) -> Path:
    """Train the student; returns its directory (the best evaluation's weights, a Hugging Face directory).

    resume: continue from the newest checkpoint in OUT/checkpoints (a fresh start if there is none).
    stop_after_steps: stop after that many optimizer steps with a checkpoint, as an interruption would
    (the schedule stays that of the whole run), to be continued with resume=True.
    teacher_urls: vLLM servers of the teacher that score the student's own samples (train.on_policy).
    """
    run = setup(recipe, cache, out, init_from, stop_after_steps)
    with run.out_lock:
        op = make_onpolicy(run, teacher_urls)  # None at train.on_policy.fraction 0
        try:
            return _train(run, resume, op)
        finally:
            if op is not None:
                op.close()


def _train(run: Run, resume: bool, op: OnPolicy | None = None) -> Path:
    check_teacher_numbers(run)
    state = restore_or_start(run, resume)
    if op is not None:  # a fresh run starts with no scored rounds; a resumed one keeps them
        op.open(state.resumed_from is not None)
    run.accelerator.step = 0  # micro-batches since the last optimizer step: a resumed run starts at a step boundary
    # the bar is closed on any exit, so an error line starts a line of its own
    with tqdm(total=run.total_batches, initial=state.micro_batch, desc="train", unit="batch",
              disable=not run.main) as bar:
        while not finished(run, state):
            # one micro-batch: forward and backward; at the end of an accumulation window, the optimizer step
            grad_norm = train_step(run, state, op)
            bar.update(1)
            if run.accelerator.sync_gradients:
                log_step(run, state, grad_norm, bar)
            # once an epoch, and at the end: evaluate, keep the best weights, stop early when it stopped improving
            if run.order.epoch_ends(state.micro_batch) or state.micro_batch == run.total_batches:
                evaluate(run, state)
            # at optimizer-step boundaries: a checkpoint when one is due; --stop-after-steps returns here
            if state.micro_batch % run.cfg.grad_accum == 0 and checkpoint_if_due(run, state):
                return run.out_dir
    finish(run, state, op)
    return run.out_dir


def restore_or_start(run: Run, resume: bool) -> LoopState:
    """The newest checkpoint's state with resume (weights, optimizer, schedule and RNG restored), else a
    fresh state, old checkpoints removed."""
    state = LoopState(swamp=SwampWatch(run.cfg))
    root = run.ckpt.root
    existing = list_checkpoints(root)
    if run.main:
        remove_partial(root)
    if resume and existing:
        loop, rng = run.ckpt.load(existing[-1], run.settings)
        state.restore(loop, str(existing[-1]))
        if rng is not None:
            set_rng_state(rng)
        if run.main:
            log.info("resuming from %s (optimizer step %d of %d)", existing[-1], state.step(run.cfg.grad_accum),
                     run.total_steps)
        return state
    if resume and run.main:
        log.warning("--resume: no checkpoint in %s; starting from the beginning", root)
    if existing and run.main:
        log.info("removing %d checkpoint(s) of an earlier run in %s (use --resume to continue one)", len(existing),
                 root)
    if run.main:
        shutil.rmtree(root, ignore_errors=True)
    barrier(run.world)
    return state


def finished(run: Run, state: LoopState) -> bool:
    """The last micro-batch is done, or early stopping ended the run (at the end of its step)."""
    at_boundary = state.micro_batch % run.cfg.grad_accum == 0
    return state.micro_batch >= run.total_batches or (state.stopped is not None and at_boundary)


def train_step(run: Run, state: LoopState, op: OnPolicy | None = None):
    """One micro-batch: this rank's share of the global batch, forward, backward, and the optimizer step
    when the accumulation window ends. Returns the gradient norm clipped at that step (else None).
    On-policy, the round's student-written sequences replace theirs in the batch (train/onpolicy.py).
    A non-finite loss or gradient norm stops the run before the optimizer step can write it into the weights.
    Its wall and CPU time are added to the step's (step_seconds in the log), for benchmarks to read."""
    clock, cpu = time.perf_counter(), time.process_time()
    cfg, rank, world = run.cfg, run.rank, run.world
    batch = run.order.batch(state.micro_batch)
    student = run.accelerator.unwrap_model(run.model)
    task = run.task if op is None else op.round(run.task, state.micro_batch, batch, student)
    local, weight = batch[rank::world], world / task.count(batch)
    if not local:  # a short last batch leaves this rank nothing: take part with a zero-weight example
        local, weight = batch[:1], 0.0
    grad_norm = None
    run.model.train()
    with run.accelerator.accumulate(run.model):
        kd, ce = task.loss_sums(run.model, local, run.divergence_params)
        terms = torch.tensor([kd.item(), ce.item()], dtype=torch.float64) * (weight / world)
        terms = all_reduce_sum(terms, world)  # the whole batch's mean KD and CE (every rank sees the same)
        if not torch.isfinite(terms).all():
            diverged(run, state, f"the loss is not finite (KD {terms[0].item():.4g}, CE {terms[1].item():.4g})")
        run.accelerator.backward(total_loss(kd, ce, cfg.alpha, cfg.temperature) * weight)
        if run.accelerator.sync_gradients and not run.deepspeed:
            grad_norm = run.accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
            if not math.isfinite(float(grad_norm)):
                diverged(run, state, f"the gradient norm is {float(grad_norm):.4g}")
        run.optimizer.step()
        run.optimizer.zero_grad()
    state.window[0] += terms[0].item() / cfg.grad_accum
    state.window[1] += terms[1].item() / cfg.grad_accum
    state.micro_batch += 1
    state.step_clock[0] += time.perf_counter() - clock
    state.step_clock[1] += time.process_time() - cpu
    return grad_norm


def diverged(run: Run, state: LoopState, what: str) -> None:
    """Stop the run with one line: the step that diverged, and what was kept from before it."""
    step = state.step(run.cfg.grad_accum) + 1
    kept = list_checkpoints(run.ckpt.root)
    kept = f"the last checkpoint is {kept[-1]}" if kept else "no checkpoint was written before it"
    raise DistillError(f"training diverged at optimizer step {step} of {run.total_steps}: {what}; stopped before "
                       f"that step changed the weights and saved nothing of it ({kept}). {advice(run)}")


def advice(run: Run) -> str:
    """What to do after a divergence (resuming would replay it; another --out keeps this run's checkpoints)."""
    return (f"Lower train.lr (now {run.cfg.lr:g}), or check the cache and the starting weights, then train again "
            "(into another --out to keep these checkpoints)")


def check_weights(run: Run, what: str) -> None:
    """Refuse to save weights holding NaN or inf (every rank checks its parameters, or its ZeRO partition)."""
    bad = any(not torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in run.params)
    flag = all_reduce_sum(torch.tensor([float(bad)]), run.world)
    if flag.item() > 0:
        raise DistillError(f"{what}: the weights hold non-finite values (NaN or inf), so they were not saved. "
                           f"{advice(run)}")


def check_teacher_numbers(run: Run) -> None:
    """A cache's soft labels with NaN or +inf would drop out of the divergence or poison it: refuse them
    before the first step (-inf is a label at probability 0). A top-k cache is streamed: its numbers are
    only seen by the loss, whose non-finite value stops the run at its step."""
    for name, split in (("teacher", "train"), ("teacher_val", "validation")):
        t = getattr(run.task, name, None)
        if isinstance(t, torch.Tensor) and (t.isnan().any() or t.isposinf().any()):
            raise DistillError(f"{run.cache_dir}: the {split} split's teacher scores hold NaN or +inf; the cache is "
                               "damaged: run `distill generate` again into a new cache")


def log_step(run: Run, state: LoopState, grad_norm, bar) -> None:
    """After an optimizer step: the schedule steps, the step's mean loss terms are logged and watched."""
    step = state.step(run.cfg.grad_accum)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    if run.deepspeed:
        grad_norm = run.model.get_global_grad_norm()
    (kd, ce), state.window = state.window, [0.0, 0.0]
    (seconds, cpu), state.step_clock = state.step_clock, [0.0, 0.0]
    rec = step_record(step, kd, ce, lr, grad_norm, run.cfg, seconds, cpu)
    state.history.append(rec)
    state.swamp.update(step, kd, ce, run.main)
    bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{kd:.3f}", ce=f"{ce:.3f}")
    run.accelerator.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=step)


def evaluate(run: Run, state: LoopState) -> None:
    """Score the validation split; save the weights when they are the best so far; early stopping."""
    step = state.step(run.cfg.grad_accum)
    ev = run.task.evaluate(run.accelerator.unwrap_model(run.model), run.rank, run.world, run.divergence_params)
    ev.update(epoch=round(run.order.epochs_done(state.micro_batch), 3), step=step, elapsed_s=round(state.elapsed(), 1))
    if not math.isfinite(ev["val_loss"]):
        raise DistillError(f"training diverged by optimizer step {step} of {run.total_steps}: the validation loss is "
                           f"{ev['val_loss']}; these weights were not saved. {advice(run)}")
    state.history.append(ev)
    if run.main:
        log_evaluation(ev, run.cfg)
    run.accelerator.log({f"eval/{k}": v for k, v in ev.items() if k not in ("step", "elapsed_s")}, step=step)
    if better(ev, state.best, run.metric):
        state.best, state.bad_evals = ev, 0
        save_best(run)
    else:
        state.bad_evals += 1
        patience = run.cfg.early_stopping_patience
        if patience and state.bad_evals >= patience:
            state.stopped = (f"early stopping at epoch {ev['epoch']}: no better {run.metric} for "
                             f"{state.bad_evals} evaluation(s)")
            if run.main:
                log.info(state.stopped)
    state.eval_unsaved = True
    run.accelerator.wait_for_everyone()


def checkpoint_if_due(run: Run, state: LoopState) -> bool:
    """Checkpoint every train.checkpoint_every steps, after an evaluation, at the end, and where
    --stop-after-steps stops the run; returns True for that stop."""
    step = state.step(run.cfg.grad_accum)
    done = state.micro_batch >= run.total_batches or state.stopped is not None
    stop_here = run.stop_after_steps is not None and step >= run.stop_after_steps and not done
    periodic = run.cfg.checkpoint_every and step % run.cfg.checkpoint_every == 0
    if periodic or state.eval_unsaved or done or stop_here:
        check_weights(run, f"checkpoint of optimizer step {step}")
        state.eval_unsaved = False
        run.ckpt.save(step, state.record(), run.settings)
    if stop_here:
        if run.main:
            log.info("stopped after optimizer step %d of %d as asked; continue with --resume", step, run.total_steps)
        run.accelerator.wait_for_everyone()
    return stop_here


def save_best(run: Run) -> None:
    """The best evaluation's weights as a Hugging Face directory (rank 0 writes; ZeRO-3 gathers on every rank)."""
    cfg = run.cfg
    check_weights(run, "the best evaluation's model")
    state = run.accelerator.get_state_dict(run.model) if zero_stage(run.accelerator) == 3 else None
    if run.main:
        m = run.accelerator.unwrap_model(run.model)
        if cfg.student.quantization and cfg.lora and cfg.lora.merge:  # QLoRA: merge into full-precision weights
            m = dense_lora_copy(m, cfg.student, cfg.lora, run.base_path, run.tok, run.labels)
        save_model(m, run.tok, run.out_dir, merge=cfg.lora.merge if cfg.lora else True, state_dict=state)


def finish(run: Run, state: LoopState, op: OnPolicy | None = None) -> None:
    """training.json, train_log.jsonl, training.png and the model card (rank 0); trackers closed."""
    if run.main:
        summary = summary_record(run, state)
        if op is not None:
            summary["on_policy"] = op.summary()
        write_run_files(run.out_dir, summary, state.history)
        from distill.models.model_card import write_model_card

        write_model_card(run.out_dir, summary, run.recipe)
    for tracker in run.accelerator.trackers:  # not acc.end_training(): that also ends the process group
        tracker.finish()
    run.accelerator.wait_for_everyone()


def summary_record(run: Run, state: LoopState) -> dict:
    cfg, task = run.cfg, run.recipe.task
    return {"recipe": run.recipe.path, "task_type": task.type, "alpha": cfg.alpha, "temperature": cfg.temperature,
            "loss": cfg.loss, "loss_params": run.divergence_params, "base": run.base_path,
            "layers": run.accelerator.unwrap_model(run.model).config.num_hidden_layers, "parameters": run.n_params,
            "trainable_parameters": count_parameters(run.params),
            "train_examples": len(run.task.train), "validation_examples": len(run.task.val), "best": state.best,
            "best_metric": run.metric, "overfit_gap": cfg.overfit_gap, "steps": state.step(cfg.grad_accum),
            "total_steps": run.total_steps, "stopped_early": state.stopped, "resumed_from": state.resumed_from,
            "warnings": state.swamp.messages, "seconds": round(state.elapsed(), 1), "world_size": run.world,
            "distributed": str(run.accelerator.distributed_type).split(".")[-1],
            "zero_stage": zero_stage(run.accelerator) or None,
            "mixed_precision": cfg.mixed_precision, "cache": str(run.cache_dir) if cfg.reads_cache else None,
            "data_fingerprint": run.settings["identity"]["data_fingerprint"], "teacher": redact(run.recipe.teacher),
            "label_tokens": run.labels is not None, "step_seconds_mean": mean_of(state.history, "step_seconds"),
            "step_cpu_seconds_mean": mean_of(state.history, "step_cpu_seconds")}


def mean_of(history: list[dict], key: str) -> float | None:
    """The mean of a per-step figure over the logged steps (None when no step logged it)."""
    values = [h[key] for h in history if key in h]
    return round(sum(values) / len(values), 4) if values else None
