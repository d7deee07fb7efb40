"""Reading recipes and teacher specs: safe YAML, `extends:` chains, the deprecated train.max_length, `--set`
and option overrides. Each source of keys is checked by the builder and `checks` as it comes in, so an
error names the file, the `--set` or the option that brought the bad value.

YAML is read as data a stranger may have written: no key twice in a mapping (YAML would keep the last
silently), at most MAX_DEPTH levels of nesting and MAX_NODES values once aliases are expanded (an alias
bomb), and at most MAX_BYTES of text; each refused with one line naming the file and the line.
"""
from __future__ import annotations

import logging
import re
import typing
from pathlib import Path

import yaml

from distill.config.checks import _check_fields, from_dict, show, validate_recipe, validate_teacher_spec
from distill.config.recipe import Recipe, TeacherSpec
from distill.errors import UsageError

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20  # a recipe is a page of keys; a larger file is not one
MAX_DEPTH = 64  # nesting levels, aliases expanded (a recipe needs four)
MAX_NODES = 100_000  # values once aliases are expanded


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (merge keys `<<:` excepted)."""

    at = staticmethod(lambda line: f"<yaml>:{line}")  # the error's location: file and line

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise UsageError(f"{self.at(key_node.start_mark.line + 1)}: duplicate key {show(key)} (first "
                                     f"on line {seen[key]}); each key may appear once in a mapping")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _refuse_deep_events(text: str, at) -> None:
    """Nesting deeper than MAX_DEPTH, found on the parser's events (the parser keeps its own stack; the
    composer after it recurses once a level, and would die of a RecursionError on 10,000 levels)."""
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise UsageError(f"{at(ev.start_mark.line + 1)}: nested deeper than {MAX_DEPTH} levels; "
                                 "a recipe is a few levels of keys")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _measure(node, depth: int, memo: dict, at) -> tuple[int, int]:
    """(values, levels) of a composed node with its aliases expanded; shared nodes are measured once, so
    an alias bomb is measured in the time of its text and refused before anything expands it."""
    if id(node) in memo:
        size, height = memo[id(node)]
    else:
        size, height = 1, 1
        if depth < MAX_DEPTH and not isinstance(node, yaml.ScalarNode):
            pairs = node.value if isinstance(node, yaml.MappingNode) else [(child,) for child in node.value]
            for pair in pairs:
                for child in pair:
                    s, h = _measure(child, depth + 1, memo, at)
                    size, height = size + s, max(height, h + 1)
        elif depth >= MAX_DEPTH:
            height = MAX_DEPTH + 1  # an alias that contains itself ends here too
        memo[id(node)] = (size, height)
    line = node.start_mark.line + 1
    if depth + height > MAX_DEPTH + 1:
        raise UsageError(f"{at(line)}: nested deeper than {MAX_DEPTH} levels once its aliases are expanded; "
                         "a recipe is a few levels of keys")
    if size > MAX_NODES:
        raise UsageError(f"{at(line)}: more than {MAX_NODES} values once its aliases are expanded (an alias "
                         "bomb?); a recipe is a page of keys")
    return size, height


def safe_yaml(text: str, src: str, one_value: bool = False):
    """`text` read as YAML data under the limits above; a YAML error is one line naming `src` and the line
    (`one_value`: a --set value, its line left out)."""
    if len(text) > MAX_BYTES:
        raise UsageError(f"{src}: {len(text)} characters; a recipe is at most {MAX_BYTES} (is this the right file?)")
    loader = _Loader(text)
    loader.at = (lambda line: src) if one_value else (lambda line: f"{src}:{line}")
    try:
        _refuse_deep_events(text, loader.at)
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, 1, {}, loader.at)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{src}: the value is" if one_value else f"{src}:{mark.line + 1}:" if mark else f"{src}:"
        raise UsageError(f"{where} not valid YAML ({show(getattr(e, 'problem', None) or str(e))})") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
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
        raise UsageError(f"{src}: train.max_length ({show(value)}) and task.max_length ({show(task['max_length'])}) "
                         "differ; train.max_length is deprecated: keep task.max_length only")
    task["max_length"] = value
    log.warning("%s: train.max_length is deprecated; move it to task.max_length", src)
    return {**data, "train": train, "task": task}


def _checked_layer(data: dict, src: str) -> dict:
    """One source of recipe keys (a file, a --set, an option), checked alone (keys, types, ranges, names)
    so that an error names that source; the other keys keep their valid defaults."""
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
    if not data and not seen:
        raise UsageError(f"{path}: the recipe is empty; expected a mapping of keys (name, workdir, teacher, task, "
                         "generate, train); see recipes/ for examples")
    parent = data.pop("extends", None)
    data = _checked_layer(data, str(path))
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise UsageError(f"{path}: extends: expected the path of another recipe, got {show(parent)}")
    return _deep_merge(_read_chain(path.parent / parent, (*seen, here)), data)


def _nest(dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    out = {last: value}
    for p in reversed(parents):
        out = {p: out}
    return out


_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def parse_set(item: str) -> dict:
    """`--set KEY=VALUE`: the value is read as YAML (`16`, `[q_proj, v_proj]`, `null`), under the file's limits."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not _KEY.fullmatch(key) or key.count(".") >= MAX_DEPTH:
        raise UsageError(f"--set {show(item)}: expected KEY=VALUE with a dotted recipe key, "
                         "e.g. --set train.lora.r=16")
    return _nest(key, safe_yaml(text, f"--set {show(item)[1:-1]}", one_value=True))


def load_recipe(path: str | Path | Recipe, sets: typing.Iterable[str] = (), overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe: the one place a recipe's values are checked. `extends: other.yaml`
    supplies defaults; then each `--set KEY=VALUE` in `sets`, then `overrides` (dotted keys from specific CLI
    options; None values skipped) apply, each checked by the same builder as the file. An empty recipe is
    refused (it would silently run every default). An already built Recipe is validated and returned."""
    if isinstance(path, Recipe):
        validate_recipe(path)
        return path
    path = Path(path)
    data = _read_chain(path)
    for item in sets:
        src = f"--set {show(item)[1:-1]}"
        data = _deep_merge(data, _checked_layer(parse_set(item), src))
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
