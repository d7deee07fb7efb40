"""`distill write-texts`: the teacher (any model a backend serves) writes new unlabelled in-domain texts.

Each prompt is `write_texts.instruction` and a few training texts drawn with a seed; each answer is
cleaned to one line, and kept only when it is not empty, not too long, and unlike every text kept before
it and every text of every split (train, validation, the holdout, and `task.holdout_data` above all),
compared after `leakage.normalize_text` (case, Unicode form and whitespace). The texts go to
WORKDIR/written/texts.jsonl; `manifest.json` beside it records the teacher, the settings and the counts kept
and dropped by reason. `task.written_data` then joins them to the unlabelled pool (cache/written_pool.py).

Same seed, same texts: prompts go to the teacher in fixed rounds of `batch_size` (round r holds prompts
r*B .. r*B+B-1, their examples and sampling seeds a function of the seed and the prompt's number), and
the filter is a function of the texts in order. A round's lines are appended, then the manifest records
the round; a re-run drops any line of an unrecorded round and goes on from the next round, so an
interrupted run, or one given a larger `count`, ends with the texts of one uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import Recipe, TeacherSpec, resolve_teacher, validate_recipe
from distill.data.leakage import normalize_text
from distill.data.prompts import prompt_ids, stop_ids
from distill.data.read import read_rows
from distill.data.splits import Splits, labelled_indices, prepare_splits
from distill.errors import UsageError, redact
from distill.fileio import atomic_write_text, directory_lock
from distill.teacher.common import Sampling

log = logging.getLogger(__name__)

TEXTS, MANIFEST = "texts.jsonl", "manifest.json"
REASONS = ("empty", "overlong", "duplicate", "in_train", "in_validation", "in_holdout")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|(?:new )?message:)\s*", re.IGNORECASE)
_QUOTES = ('"', "'", "\u201c", "\u201d", "`")


def written_dir(recipe: Recipe) -> Path:
    return recipe.workdir_path / "written"


def prompt_seed(base: int, index: int) -> int:
    """The sampling seed of prompt `index`: the same on every run and in any round."""
    return (int(base) * 1_000_003 + 7 * index + 1) % (2 ** 31 - 1)


# ---------------------------------------------------------------------------------------------
# what a written text is compared with, and the filter


def split_texts(recipe: Recipe, splits: Splits) -> dict[str, str]:
    """Every text of every split, normalised, mapped to the first split holding it (holdout first, so a
    text of the holdout is reported as such). `task.holdout_data` is read here (a file that cannot be read is
    an error: written texts must not reach the pool unchecked against the official test split)."""
    task, out = recipe.task, {}
    holdout = [ex["text"] for ex in splits.holdout]
    if task.holdout_data:
        if not task.holdout_data.startswith("builtin:") and not Path(task.holdout_data).exists():
            raise UsageError(f"task.holdout_data: {task.holdout_data}: no such file; written texts are checked "
                             "against it, so it must be readable")
        holdout += [str(row[task.text_field]) for _, row in read_rows(task.holdout_data)
                    if isinstance(row.get(task.text_field), (str, int)) and not isinstance(row[task.text_field], bool)]
    for name, texts in (("holdout", holdout), ("validation", [ex["text"] for ex in splits.validation]),
                        ("train", [ex["text"] for ex in splits.train])):
        for t in texts:
            out.setdefault(normalize_text(t), name)
    return out


def clean_text(raw: str, finished: bool, max_chars: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason): the answer's first non-empty line (after a preamble line ending in a
    colon), a list mark and surrounding quotes dropped, whitespace runs made one space; `empty` without a
    letter or digit. A line that the token limit cut off (the answer's last line, no line end and no stop
    token) is `overlong`, as is one above `max_chars`."""
    lines = [ln for ln in raw.replace("\r", "\n").split("\n") if ln.strip()]
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):  # a preamble ("Here is a new message:")
        lines = lines[1:]
    if not lines:
        return None, "empty"
    text = _BULLET.sub("", lines[0].strip(), count=1).strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    text = " ".join(text.split())
    if not any(c.isalnum() for c in text):  # nothing but punctuation (a lone quote mark, "...")
        return None, "empty"
    cut = not finished and len(lines) == 1 and not raw.rstrip(" \t").endswith("\n")
    if cut or len(text) > max_chars:
        return None, "overlong"
    return text, None


@dataclass
class TextFilter:
    """Keeps a text unless it is empty, too long, a repeat of a kept one or a text of a split (normalised)."""

    splits: dict[str, str]  # normalised split text -> its split
    max_chars: int
    seen: set[str] = field(default_factory=set)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def offer(self, raw: str, finished: bool) -> str | None:
        text, reason = clean_text(raw, finished, self.max_chars)
        if text is not None:
            key = normalize_text(text)
            if key in self.splits:
                reason = f"in_{self.splits[key]}"
            elif key in self.seen:
                reason = "duplicate"
            else:
                self.seen.add(key)
                return text
        self.dropped[reason] += 1
        return None


# ---------------------------------------------------------------------------------------------
# prompts


def example_pool(recipe: Recipe, splits: Splits) -> list[list[str]]:
    """The texts prompts draw from, as groups: one per class with `per_label` (the labelled budget's rows
    alone when there is one: other rows' labels may not be read), else one group of every training text."""
    task, cfg = recipe.task, recipe.write_texts
    if not cfg.per_label:
        return [[ex["text"] for ex in splits.train]]
    rows = labelled_indices(task, splits)
    rows = range(len(splits.train)) if rows is None else rows
    groups: dict[str, list[str]] = {}
    for i in rows:
        groups.setdefault(splits.train[i]["label"], []).append(splits.train[i]["text"])
    order = sorted(groups)
    random.Random(cfg.seed).shuffle(order)
    return [groups[c] for c in order]


def prompt_examples(pool: list[list[str]], n: int, seed: int, index: int) -> list[str]:
    """Prompt `index`'s examples: up to n texts of group index mod len(pool), drawn with a per-prompt seed."""
    group = pool[index % len(pool)]
    return random.Random(prompt_seed(seed, index)).sample(group, min(n, len(group)))


def prompt_text(instruction: str, examples: list[str]) -> str:
    return instruction.strip() + "\n\nExamples:\n" + "".join(f"- {' '.join(t.split())}\n" for t in examples)


def prompt_tokens(recipe: Recipe, tok, pool, index: int) -> list[int]:
    cfg = recipe.write_texts
    task = dataclasses.replace(recipe.task, instruction="")
    text = prompt_text(cfg.instruction, prompt_examples(pool, cfg.examples_per_prompt, cfg.seed, index))
    return prompt_ids(tok, task, None, text)


# ---------------------------------------------------------------------------------------------
# the file and its manifest


def identity(recipe: Recipe, spec: TeacherSpec, splits: Splits) -> dict:
    """What the texts are a function of: a run may continue a file only with all of it unchanged."""
    settings = {k: v for k, v in dataclasses.asdict(recipe.write_texts).items() if k not in ("count", "max_prompts")}
    return {"teacher": redact(spec.source or spec.url or ",".join(spec.urls or [])),
            "data_fingerprint": splits.fingerprint, **settings}


def read_state(out: Path, wanted: dict) -> tuple[dict, list[dict]]:
    """The manifest and the lines of its recorded rounds (a killed run's extra lines dropped); a fresh
    state when there is none. Refused when the file was written with other settings."""
    mpath, tpath = out / MANIFEST, out / TEXTS
    if not mpath.exists():  # lines without a manifest are a first round that a kill left unrecorded
        if tpath.exists():
            atomic_write_text(tpath, "")
        return {"identity": wanted, "rounds": 0, "prompts": 0, "kept": 0, "dropped": dict.fromkeys(REASONS, 0)}, []
    try:
        state = json.loads(mpath.read_text(encoding="utf-8"))
        old = state["identity"]
        rounds = int(state["rounds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{mpath}: not a write-texts manifest ({e}); move the directory away") from None
    diff = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
    if diff:
        raise UsageError(f"{out}: written with other settings ({', '.join(diff)} differ); restore them, or move "
                         "the directory away to write anew")
    lines = []
    if tpath.exists():
        for n, raw in enumerate(tpath.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(raw)
            except ValueError:  # a line cut by a kill: its round was not recorded
                row = {"round": rounds}
            if row.get("round", rounds) < rounds:
                lines.append(row)
    if len(lines) != state["kept"]:
        raise UsageError(f"{tpath}: holds {len(lines)} texts of recorded rounds, the manifest says {state['kept']}")
    atomic_write_text(tpath, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return state, lines


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# the run


def _teacher(recipe: Recipe, teacher, backend, urls):
    """The teacher spec, its backend's name, model path and tokenizer."""
    from distill.models.loading import load_tokenizer, resolve_model_path
    from distill.teacher.backend import pick_backend

    spec = resolve_teacher(teacher or recipe.teacher)
    if urls:
        from distill.teacher.remote import normalize_url

        if backend not in (None, "auto", "server"):
            raise UsageError(f"--teacher-url sends the work to a server; it cannot be combined with "
                             f"--backend {backend}")
        spec.url, spec.urls, backend = None, [normalize_url(u) for u in urls], "server"
        spec.backend = "server"
    name = pick_backend(backend or recipe.generate.backend, spec)
    source = spec.tokenizer or spec.source
    if not source:
        raise UsageError(f"teacher {spec.name}: a served teacher needs a local tokenizer; give the spec a `source`")
    model_path = resolve_model_path(source)
    return spec, name, model_path, load_tokenizer(model_path)


def run_write_texts(recipe: Recipe, teacher: str | None = None, backend: str | None = None,
                    out: str | Path | None = None, urls: list[str] | None = None) -> Path:
    """Write texts until `write_texts.count` are kept (or `max_prompts` prompts were tried) into OUT (default
    WORKDIR/written); continues a partial file. Returns OUT/texts.jsonl."""
    validate_recipe(recipe)
    cfg, src = recipe.write_texts, recipe.path or "recipe"
    if recipe.task.type != "classification":
        raise UsageError(f"{src}: write-texts writes texts for a classification task, got task.type "
                         f"{recipe.task.type!r}")
    splits = prepare_splits(recipe.task, recipe.workdir, src, write=False)
    spec, backend_name, model_path, tok = _teacher(recipe, teacher, backend, urls)
    out = Path(out or written_dir(recipe))
    with directory_lock(out, "another write-texts run ({holder}) is writing here; wait for it to finish"):
        state, lines = read_state(out, identity(recipe, spec, splits))
        filt = TextFilter(split_texts(recipe, splits), cfg.max_chars, dropped=dict(state["dropped"]))
        for row in lines:  # what was kept before: the texts after it are compared with them too
            filt.seen.add(normalize_text(row["text"]))
        _rounds(recipe, Job(spec, backend_name, model_path, tok, example_pool(recipe, splits)), out, state, filt)
    log.info("%s: %d texts kept; dropped: %s", out / TEXTS, state["kept"],
             ", ".join(f"{k} {v}" for k, v in state["dropped"].items() if v) or "none")
    return out / TEXTS


@dataclass
class Job:
    spec: TeacherSpec
    backend: str
    model_path: str
    tok: object
    pool: list[list[str]]
    engine: object = None


def _rounds(recipe: Recipe, job: Job, out: Path, state: dict, filt: TextFilter) -> None:
    """Rounds of batch_size prompts until enough texts are kept; each recorded in the manifest after its lines."""
    cfg = recipe.write_texts
    limit = cfg.max_prompts or 4 * cfg.count
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        seed=cfg.seed, stop_ids=stop_ids(job.tok))
    (out / TEXTS).touch()
    try:
        while state["kept"] < cfg.count and state["prompts"] < limit:
            r, first = state["rounds"], state["rounds"] * cfg.batch_size
            index = list(range(first, first + cfg.batch_size))
            prompts = [prompt_tokens(recipe, job.tok, job.pool, i) for i in index]
            room = job.spec.max_model_len - max(map(len, prompts))
            if room < 1:
                raise UsageError(f"write_texts: a prompt of {max(map(len, prompts))} tokens fills the teacher's "
                                 f"max_model_len={job.spec.max_model_len}; lower examples_per_prompt")
            s = dataclasses.replace(sampling, max_new_tokens=min(cfg.max_new_tokens, room))
            kept, seeds = [], [prompt_seed(cfg.seed, i) for i in index]
            for i, g in zip(index, _engine(job).generate_topk(prompts, 1, s, seeds)):
                resp = list(g.response)
                finished = bool(resp) and resp[-1] in s.stop_ids
                text = filt.offer(job.tok.decode(resp, skip_special_tokens=True), finished)
                if text is not None:
                    kept.append({"text": text, "prompt": i, "round": r})
            _append(out / TEXTS, kept)
            state.update(rounds=r + 1, prompts=first + len(index), kept=state["kept"] + len(kept),
                         dropped=dict(filt.dropped), count=cfg.count, backend=job.backend)
            atomic_write_text(out / MANIFEST, json.dumps(state, indent=2, ensure_ascii=False))
            log.info("write-texts round %d: %d kept (%d in all)", r, len(kept), state["kept"])
    finally:
        if job.engine is not None:
            job.engine.close()
    if state["kept"] < cfg.count:
        log.warning("write_texts: %d of %d texts kept after %d prompts (max_prompts); raise it or the temperature",
                    state["kept"], cfg.count, state["prompts"])


def _engine(job: Job):
    if job.engine is None:
        from distill.models.loading import vocab_rows_or_tokenizer
        from distill.teacher.backend import make_backend

        log.info("loading teacher %s with the %s backend", redact(job.spec.name), job.backend)
        job.engine = make_backend(job.backend, job.spec, job.model_path, 1, tok=job.tok,
                                  vocab_rows=vocab_rows_or_tokenizer(job.model_path, job.tok))
    return job.engine
