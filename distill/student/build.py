"""Building the student: a model directory as is, or the teacher cut down to a subset of its layers,
optionally wrapped with LoRA adapters."""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch

from distill.config import LoraConfig, StudentConfig
from distill.errors import DistillError, UsageError
from distill.fileio import pause_point, publish_files, ran_out_of_space
from distill.models.label_tokens import add_label_tokens
from distill.models.loading import hf_kwargs, load_causal_lm, resolve_model_path
from distill.student.cut import cut

log = logging.getLogger(__name__)


def _load_4bit(path: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    device = int(os.environ.get("LOCAL_RANK", 0))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=torch.bfloat16,
                                                device_map={"": device}, **hf_kwargs())


def build_student(cfg: StudentConfig, teacher_path: str, dtype: str = "float32", gradient_checkpointing: bool = False,
                  texts: list[list[int]] | None = None, pad_id: int = 0, plan=None):
    """The student model: `cfg.model` if set, else the teacher cut to a subset of its layers (or all) and,
    when asked, to narrower MLPs and fewer heads (distill/student/cut.py).

    `texts` (token ids of the task's training texts) are what importance is measured on, and the
    forward throughput of teacher and student is timed on; `plan` rebuilds a student already planned
    (the dense copy of a QLoRA student). `cfg.quantization == "4bit"` loads the base in NF4 for QLoRA
    (the recipe's side is checked by config, the machine's, a CUDA GPU and bitsandbytes, by
    `train.setup.check_machine`).
    """
    path = resolve_model_path(cfg.model) if cfg.model else teacher_path
    model = _load_4bit(path) if cfg.quantization == "4bit" else load_causal_lm(path, dtype)
    if not cfg.model:
        cut(model, cfg, texts, pad_id, plan)
    if cfg.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        model.config.use_cache = False
    return model


def add_lora(model, cfg: LoraConfig, trainable_tokens: list[int] | None = None):
    """LoRA adapters on cfg.target_modules; `trainable_tokens` (label token ids) train their embedding
    and output rows through PEFT's trainable tokens."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise UsageError(f"train.lora.target_modules: {missing} not found in the model "
                         f"(it has e.g. {', '.join(sorted(x for x in names if 'proj' in x)[:8])})")
    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
                          trainable_token_indices=list(trainable_tokens) if trainable_tokens else None)
    return get_peft_model(model, pcfg)


def dense_lora_copy(peft_model, student_cfg: StudentConfig, lora_cfg: LoraConfig, base_path: str,
                    tok=None, labels: list[str] | None = None):
    """A full-precision copy of a (Q)LoRA student for saving: the base loaded again without
    quantization, cut to the same layers, with the trained adapter weights loaded into it (merging an
    adapter into 4-bit weights would round them, and an adapter alone cannot be reloaded on a layer
    subset of its base)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    dense = build_student(dataclasses.replace(student_cfg, quantization=None), base_path,
                          plan=getattr(peft_model, "distill_plan", None))
    tokens = None
    if labels:  # the label token rows: resized here, their trained values come with the adapter
        tokens = add_label_tokens(dense, tok, labels)
    dense = add_lora(dense, lora_cfg, tokens)
    adapter = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    result = set_peft_model_state_dict(dense, adapter)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"adapter weights that the dense copy lacks: {unexpected[:5]}")
    return dense


def save_model(model, tok, out: Path, merge: bool = True, state_dict: dict | None = None) -> None:
    """Save a standard HF directory: LoRA merged into the weights, or the adapter alone.

    Written into OUT/.tmp-model first and moved in file by file (fsynced, renamed), so a run killed
    while saving leaves the previous best model whole. `state_dict`: the full weights when the
    model's own are partitioned (DeepSpeed ZeRO-3).
    """
    tmp = out / ".tmp-model"
    if tmp.is_symlink():  # a link planted at the temporary name: removed, never followed
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _save_pretrained(model, tok, tmp, merge, state_dict)
        pause_point("model_written")
        publish_files(tmp, out)
    except Exception as e:
        if not ran_out_of_space(out, e):
            raise
        raise DistillError(f"{out}: no space left on the device while saving the model; the previous one (if "
                           f"any) is kept whole. Free some space and run the same command with --resume.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_pretrained(model, tok, out: Path, merge: bool, state_dict: dict | None) -> None:
    if state_dict is not None:
        model.save_pretrained(out, state_dict=state_dict)
    elif any(getattr(m, "is_loaded_in_4bit", False) for m in (model, getattr(model, "base_model", None))):
        # QLoRA: merging into 4-bit weights would round them; save the adapter, loadable on its base
        if merge:
            log.warning("QLoRA student: saving the LoRA adapter unmerged (merging into 4-bit weights loses precision)")
        model.save_pretrained(out)
    elif hasattr(model, "merge_and_unload"):
        if merge:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(out)
        else:
            model.save_pretrained(out)
    else:
        model.save_pretrained(out)
    tok.save_pretrained(out)


