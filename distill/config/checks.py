"""Building the dataclasses from YAML values and validating a whole recipe: every recipe check, once.

`from_dict` refuses unknown keys (suggesting the closest known one) and values of the wrong type;
`validate_recipe` checks types, choices, ranges, names and the combinations of keys in one pass. What
only a machine can answer (a CUDA GPU, an installed package) is checked where the work starts
(`train.setup.check_machine`), not here. Every error is one short line naming the file and the key:
values are shown abridged (`show`), so a huge or deeply nested value cannot make a huge line.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from typing import Literal

from distill.config.recipe import Recipe, TeacherSpec, TrainConfig
from distill.errors import UsageError

_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlevel = 60, 60, 6, 6, 3


def show(value) -> str:
    """A value as an error line shows it: its repr, abridged."""
    return _SHOW.repr(value)


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
            raise UsageError(f"{src}: {key}: expected a number, got {show(value)}")
        if not math.isfinite(value):
            raise UsageError(f"{src}: {key}: expected a finite number, got {show(value)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{src}: {key}: expected an integer, got {show(value)}")
    return value


def _check_str(value, src, key) -> str:
    if isinstance(value, os.PathLike):  # a recipe edited in code
        return os.fspath(value)
    if isinstance(value, bool):
        raise UsageError(f"{src}: {key}: expected a string, got {value} (YAML reads an unquoted yes/no/on/off/"
                         "true/false as a boolean: quote it)")
    if not isinstance(value, (str, int, float)):
        raise UsageError(f"{src}: {key}: expected a string, got {show(value)}")
    if key.startswith("task.labels[") and not isinstance(value, str):
        # a label must match the data's text exactly, and YAML reads an unquoted 01 as the number 1
        raise UsageError(f"{src}: {key}: expected a string, got the number {value!r} (YAML reads unquoted "
                         "digits as a number, 01 as 1): quote each label as the data writes it, e.g. '01'")
    return str(value)


def _check_value(value, tp, src, key):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{src}: {key}: expected a value, got nothing")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{src}: {key}: expected a mapping of {tp.__name__} keys, got {show(value)}")
        return from_dict(tp, value, src, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value not in choices:
            raise UsageError(f"{src}: {key}: expected one of {', '.join(map(str, choices))}, got {show(value)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):  # (a tuple only from code)
            raise UsageError(f"{src}: {key}: expected a list, got {show(value)}")
        return [_check_value(v, item_tp, src, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp in (float, int):
        return _check_number(value, tp, src, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{src}: {key}: expected true or false, got {show(value)}")
        return value
    if tp is str:
        return _check_str(value, src, key)
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
            raise UsageError(f"{src}: unknown key '{prefix}{str(key)[:60]}'{hint}; known keys: {', '.join(names)}")
        kwargs[key] = _check_value(value, hints[key], src, prefix + key)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# validation: every range, once, over a whole recipe


def check_path_name(name: str, what: str) -> str:
    """A name that becomes one file or directory name (a recipe's name, a report's name): refused when it
    could name another place (a path separator, `..`, a control character) or nothing (empty)."""
    bad = ("/" in name or "\\" in name or ".." in name or not name.strip() or name == "."
           or any(ord(c) < 32 or ord(c) == 127 for c in name))
    if bad:
        raise UsageError(f"{what}: expected a name without path separators, '..' or control characters (it "
                         f"becomes a directory name), got {show(name)}")
    return name


def _check_fields(obj, src: str, prefix: str = "") -> None:
    """Types, choices, ranges and names of every field of `obj` and of the configs inside it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if f.name == "path":
            continue
        if dataclasses.is_dataclass(value):
            _check_fields(value, src, key + ".")
            continue
        if isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):  # recipe.teachers
            for i, v in enumerate(value):
                _check_fields(v, src, f"{key}[{i}].")
            continue
        _check_value(value, hints[f.name], src, key)
        if isinstance(value, (list, tuple)):
            _check_list(list(value), f.metadata, src, key)
        elif value is not None and "range" in f.metadata and not f.metadata["range"].holds(value):
            raise UsageError(f"{src}: {key}: expected {f.metadata['range']}, got {show(value)}")
        elif f.metadata.get("path_name"):
            check_path_name(value, f"{src}: {key}")


def _check_list(values: list, meta, src: str, key: str) -> None:
    rng = meta.get("range")
    for i, v in enumerate(values):
        if rng is not None and not rng.holds(v):
            raise UsageError(f"{src}: {key}[{i}]: expected {rng}, got {show(v)}")
    if meta.get("distinct"):
        if not values:
            raise UsageError(f"{src}: {key}: expected at least one value, got an empty list")
        repeated = [str(v)[:60] for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise UsageError(f"{src}: {key}: expected distinct values, got {', '.join(repeated[:5])} more than once")


def _check_task(recipe: Recipe, src: str) -> None:
    """The task's keys against each other and against the task type."""
    task, sp = recipe.task, recipe.task.split
    held = 0.0 if task.holdout_data else sp.holdout
    if sp.validation + held >= 1:
        raise UsageError(f"{src}: task.split: validation + holdout must be below 1 (the rest is the training "
                         f"split), got {sp.validation:g} + {held:g}")
    if stopping_metric(recipe) == "val_f1" and task.type != "classification":
        raise UsageError(f"{src}: train.early_stopping_metric: val_f1 exists for classification only; "
                         "generation tasks are selected by val_loss")
    if task.labelled_examples and recipe.train.train_examples:
        raise UsageError(f"{src}: task.labelled_examples: the labelled budget; train.train_examples would choose "
                         "the training texts a second way, drop it")
    if task.labelled_examples and task.type == "generation" and task.prompt is not None:
        raise UsageError(f"{src}: task.labelled_examples: under task.prompt every row's text is its response, so "
                         "no response can be withheld; drop one")
    if task.stratify_field is not None and task.type != "generation":
        raise UsageError(f"{src}: task.stratify_field: generation rows' stratum; classification is stratified by "
                         "its label")
    if recipe.train.sequence_kd and (task.type != "generation" or recipe.train.alpha > 0):
        raise UsageError(f"{src}: train.sequence_kd: trains a generation task on the cache's responses as text "
                         f"(no log-probabilities), so it needs task.type generation and train.alpha 0, got "
                         f"{task.type!r} and {recipe.train.alpha:g}")
    if (task.output != "text" or task.class_field) and task.type != "generation":
        raise UsageError(f"{src}: task.output / task.class_field: say how generated responses are scored, so they "
                         f"need task.type generation, got {task.type!r}")
    if task.class_field is not None and task.output != "json":
        raise UsageError(f"{src}: task.class_field: names a field of a JSON response; set task.output: json")
    if task.prompt is not None and (task.type != "generation" or not task.prompt.strip()):
        raise UsageError(f"{src}: task.prompt: a fixed prompt (non-empty) for every row of a generation task, "
                         f"got {show(task.prompt)} with task.type {task.type!r}")


def _check_on_policy(recipe: Recipe, src: str) -> None:
    op, cfg = recipe.train.on_policy, recipe.train
    if op.fraction > 0:
        if recipe.task.type != "generation":
            raise UsageError(f"{src}: train.on_policy.fraction: on-policy sampling needs task.type generation, "
                             f"got {recipe.task.type!r}")
        if cfg.alpha == 0:
            raise UsageError(f"{src}: train.on_policy.fraction > 0 needs train.alpha > 0 (the student's own "
                             "samples are learnt from the teacher's scores alone)")
    if op.loss == "sampled_reverse_kl" and (cfg.temperature, op.temperature, op.top_p) != (1, 1, 1):
        raise UsageError(f"{src}: train.on_policy.loss: sampled_reverse_kl estimates KL(student || teacher) from "
                         "samples of the student's own distribution; set train.temperature, train.on_policy."
                         f"temperature and train.on_policy.top_p to 1 (got {cfg.temperature:g}, "
                         f"{op.temperature:g} and {op.top_p:g})")


def _check_student(cfg: TrainConfig, src: str) -> None:
    """Importance-ranked layers and width pruning cut a student from the teacher, in full precision;
    QLoRA's 4-bit weights are frozen, so it needs an adapter to train."""
    st = cfg.student
    if st.quantization is not None and cfg.lora is None:
        raise UsageError(f"{src}: train.student.quantization: 4bit weights are frozen; QLoRA needs train.lora "
                         "(an adapter to train). Add a train.lora section or drop the quantization")
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


def _check_teachers(recipe: Recipe, src: str) -> None:
    """Several teachers: named distinctly (each name becomes its cache's directory), and routing needs the
    data field that names each row's teacher, which means nothing without routing."""
    teachers, task, cfg = recipe.teachers, recipe.task, recipe.train
    if teachers is not None:
        if not teachers:
            raise UsageError(f"{src}: teachers: expected at least one teacher ({{spec: ..., weight: ...}}), got []")
        for i, t in enumerate(teachers):
            if not t.spec.strip():
                raise UsageError(f"{src}: teachers[{i}].spec: expected a teacher spec, model directory or hub id")
            check_path_name(t.key, f"{src}: teachers[{i}].name")
        names = [t.key for t in teachers]
        repeated = sorted({n for i, n in enumerate(names) if n in names[:i]})
        if repeated:
            raise UsageError(f"{src}: teachers: the name {repeated[0]!r} is given to two teachers; give each a "
                             "distinct `name:` (it names the teacher's cache)")
        if cfg.on_policy.fraction > 0:
            raise UsageError(f"{src}: train.on_policy.fraction: on-policy rounds are scored by `teacher:` alone, not "
                             "by several teachers; drop one")
    if cfg.teacher_mix == "route" and (teachers is None or task.teacher_field is None):
        raise UsageError(f"{src}: train.teacher_mix: route gives each row its own teacher's numbers; it needs "
                         "`teachers:` and task.teacher_field (the data field naming each row's teacher)")
    if task.teacher_field is not None and cfg.teacher_mix != "route":
        raise UsageError(f"{src}: task.teacher_field: names each row's teacher for train.teacher_mix: route; set it "
                         "or drop the field")
    if cfg.teacher_mix == "route" and task.prompt is not None:
        raise UsageError(f"{src}: train.teacher_mix: route reads each row's teacher by its prompt, and under "
                         "task.prompt every row has the same one; drop one")


def _check_written(recipe: Recipe, src: str) -> None:
    """Teacher-written texts join a classification training split as unlabelled rows; the share of them
    means nothing without the file, and train.train_examples would sample them as a class of their own."""
    task = recipe.task
    if task.written_share is not None and task.written_data is None:
        raise UsageError(f"{src}: task.written_share: the share of task.written_data's texts training uses; "
                         "set task.written_data (the file of `distill write-texts`) or drop it")
    if task.written_data is not None:
        if task.type != "classification":
            raise UsageError(f"{src}: task.written_data: teacher-written texts join a classification task's "
                             f"unlabelled pool, got task.type {task.type!r}")
        if recipe.train.train_examples:
            raise UsageError(f"{src}: task.written_data: train.train_examples would sample the written texts "
                             "with the labelled ones; use task.labelled_examples for the labelled budget")


def validate_recipe(recipe: Recipe) -> None:
    """Refuse any value outside its type, choices or range, naming the recipe file and the key.

    Reads nothing and changes nothing, so it can run again on a recipe built or edited in code."""
    src = recipe.path or "recipe"
    _check_fields(recipe, src)
    _check_task(recipe, src)
    _check_student(recipe.train, src)
    _check_on_policy(recipe, src)
    _check_teachers(recipe, src)
    _check_written(recipe, src)


def validate_teacher_spec(spec: TeacherSpec, src: str) -> None:
    _check_fields(spec, src)


def stopping_metric(recipe: Recipe) -> str:
    """The early-stopping / best-model metric, with `auto` resolved for the task type."""
    metric = recipe.train.early_stopping_metric
    if metric == "auto":
        return "val_f1" if recipe.task.type == "classification" else "val_loss"
    return metric

