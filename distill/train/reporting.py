"""What a run reports: the swamp watch, the best-evaluation choice, the log files and the plot."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from distill.config import TrainConfig
from distill.fileio import atomic_write_bytes, atomic_write_text
from distill.train.losses import total_loss

log = logging.getLogger(__name__)


class SwampWatch:
    """Warn once when one weighted loss term stays below a small share of the total for many steps."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.runs, self.warned, self.messages = cfg, {"kd": 0, "ce": 0}, set(), []

    def update(self, step: int, kd: float, ce: float, main: bool) -> None:
        c = self.cfg
        if not 0 < c.alpha < 1:
            return
        kd_w, ce_w = c.alpha * c.temperature ** 2 * kd, (1 - c.alpha) * ce
        total = kd_w + ce_w
        if total <= 0:
            return
        for name, share in (("kd", kd_w / total), ("ce", ce_w / total)):
            self.runs[name] = self.runs[name] + 1 if share < c.swamp_fraction else 0
            if self.runs[name] >= c.swamp_steps and name not in self.warned:
                self.warned.add(name)
                self.messages.append(self._message(name, step, kd_w if name == "kd" else ce_w))
                if main:
                    log.warning(self.messages[-1])

    def _message(self, name: str, step: int, weighted: float) -> str:
        c = self.cfg
        if name == "kd":
            return (f"step {step}: the distillation term alpha*T^2*KD ({weighted:.4g}) has been under "
                    f"{c.swamp_fraction:.0%} of the loss for {c.swamp_steps} steps: the student learns from "
                    "the gold labels alone; raise train.alpha or train.temperature, or check the cache")
        return (f"step {step}: the cross-entropy term (1-alpha)*CE ({weighted:.4g}) has been under "
                f"{c.swamp_fraction:.0%} of the loss for {c.swamp_steps} steps: the gold labels have no "
                "effect; lower train.alpha or train.temperature if that is not intended")

    def state(self) -> dict:
        return {"runs": dict(self.runs), "warned": sorted(self.warned), "messages": list(self.messages)}

    def restore(self, st: dict) -> None:
        self.runs, self.warned, self.messages = dict(st["runs"]), set(st["warned"]), list(st["messages"])


def better(ev: dict, best: dict | None, metric: str) -> bool:
    if best is None:
        return True
    if metric == "val_f1":
        return (ev["val_f1"], -ev["val_loss"]) > (best["val_f1"], -best["val_loss"])
    return ev["val_loss"] < best["val_loss"]


def step_record(step: int, kd: float, ce: float, lr: float, grad_norm, cfg: TrainConfig, seconds: float | None = None,
                cpu_seconds: float | None = None) -> dict:
    """One optimizer step's line of train_log.jsonl: loss terms, learning rate, gradient norm, and its time
    (wall and this process's CPU seconds over the step's micro-batches, on-policy sampling and scoring
    included; evaluation and checkpoints not), so benchmarks read step times instead of patching the loop."""
    rec = {"step": step, "loss": total_loss(kd, ce, cfg.alpha, cfg.temperature), "kd": kd, "ce": ce, "lr": lr}
    if grad_norm is not None:
        rec["grad_norm"] = float(grad_norm)
    if seconds is not None:
        rec["step_seconds"] = round(seconds, 4)
    if cpu_seconds is not None:
        rec["step_cpu_seconds"] = round(cpu_seconds, 4)
    return rec


def log_evaluation(ev: dict, cfg: TrainConfig) -> None:
    log.info("epoch %.2f: val loss %.4f%s, val CE %.4f%s", ev["epoch"], ev["val_loss"],
             f", val macro-F1 {ev['val_f1']:.4f}, train macro-F1 {ev['train_f1']:.4f}" if "val_f1" in ev else "",
             ev["val_ce"], f", val KD {ev['val_kd']:.4f}" if "val_kd" in ev else "")
    if ev.get("train_val_gap", 0) > cfg.overfit_gap:
        log.warning("train macro-F1 exceeds validation by %.3f: the student may be overfitting", ev["train_val_gap"])


def write_run_files(out_dir: Path, summary: dict, history: list[dict]) -> None:
    """training.json, train_log.jsonl (one record per optimizer step and per evaluation), training.png."""
    atomic_write_text(out_dir / "training.json", json.dumps(summary, indent=1))
    atomic_write_text(out_dir / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot(history, out_dir / "training.png")


def plot(history: list[dict], out: Path) -> None:
    """Loss terms per step beside train vs validation F1 (or validation loss) per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "loss" in h]
    epochs = [h for h in history if "val_loss" in h or "val_f1" in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "kd", "ce"):
        if steps and key in steps[0]:
            a.plot([h["step"] for h in steps], [h[key] for h in steps], label=key)
    a.set_xlabel("optimizer step")
    a.set_title("training loss terms")
    a.legend()
    if epochs and "val_f1" in epochs[0]:
        b.plot([h["epoch"] for h in epochs], [h["train_f1"] for h in epochs], "o-", label="train macro-F1")
        b.plot([h["epoch"] for h in epochs], [h["val_f1"] for h in epochs], "o-", label="validation macro-F1")
        b.set_ylim(0, 1.02)
        b.set_title("train vs validation (watch the gap)")
    elif epochs:
        b.plot([h["epoch"] for h in epochs], [h["val_loss"] for h in epochs], "o-", label="validation loss")
        b.set_title("validation loss per epoch")
    if epochs:
        b.set_xlabel("epoch")
        b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def tracker_config(cfg: TrainConfig) -> dict:
    """The recipe's train section flattened to the scalar values trackers accept as hyperparameters."""
    import dataclasses

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                yield f"{prefix}{k}", v

    return dict(flat(dataclasses.asdict(cfg)))
