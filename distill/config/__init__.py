"""Typed configs for teacher specs (`teachers/*.yaml`) and recipes (`recipes/*.yaml`), read and checked here
once: `recipe` holds the dataclasses (every key, its type, choices and range), `checks` the one validation
pass, `load` the reading of YAML, `extends:`, `--set` and options. An unknown or mistyped key stops with an
error that names the file and the key and suggests the closest known one.
"""
from distill.config.checks import (
    _unwrap_optional,
    check_path_name,
    from_dict,
    show,
    stopping_metric,
    validate_recipe,
    validate_teacher_spec,
)
from distill.config.load import load_recipe, load_teacher_spec, parse_set, resolve_teacher, safe_yaml
from distill.config.recipe import (
    DIVERGENCES,
    MAX_LR,
    MIN_TEMPERATURE,
    SAMPLED,
    SEED_MAX,
    Backend,
    GenerateConfig,
    GenerateSplit,
    LayerSelection,
    LoraConfig,
    Loss,
    OnPolicyConfig,
    OnPolicyLoss,
    Precision,
    Quantization,
    Range,
    Recipe,
    Responses,
    Schedule,
    SplitConfig,
    StoppingMetric,
    StudentConfig,
    TaskConfig,
    TaskType,
    TeacherSpec,
    Tracker,
    TrainConfig,
    distinct,
    num,
)

__all__ = [
    "DIVERGENCES", "MAX_LR", "MIN_TEMPERATURE", "SAMPLED", "SEED_MAX", "Backend", "GenerateConfig", "GenerateSplit",
    "LayerSelection", "LoraConfig", "Loss", "OnPolicyConfig", "OnPolicyLoss", "Precision", "Quantization", "Range",
    "Recipe", "Responses", "Schedule", "SplitConfig", "StoppingMetric", "StudentConfig", "TaskConfig", "TaskType",
    "TeacherSpec", "Tracker", "TrainConfig", "_unwrap_optional", "check_path_name", "distinct", "from_dict",
    "load_recipe", "load_teacher_spec", "num", "parse_set", "resolve_teacher", "safe_yaml", "show",
    "stopping_metric", "validate_recipe", "validate_teacher_spec",
]
