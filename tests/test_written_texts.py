"""Teacher-written texts (issue 34, deliverable 2): `distill write-texts` and the unlabelled pool they join.

Most tests run the stage with a stand-in teacher whose answers are chosen by the test (texts of every split
written in other case and spacing, repeats, empty and cut answers) or are a function of the prompt and the
seed; one runs the real transformers backend on a tiny random llama."""
import json
import random

import pytest
import torch
from conftest import make_tiny_untied, write_class_data, write_recipe

from distill.cache import write_texts as wt
from distill.cache import written_pool as wp
from distill.config import load_recipe
from distill.data.leakage import normalize_text
from distill.data.splits import labelled_indices, prepare_splits
from distill.errors import UsageError
from distill.teacher.common import Generated

HOLDOUT_FILE_TEXTS = ["my refund never arrived", "how do I close my account"]
FRESH = ["is there a discount for students", "can I change the delivery address", "my card expired",
         "the app crashes when I pay", "do you ship abroad", "I want to update my email"]
EXTRA = ["please send me a receipt", "what are your opening hours", "my voucher code fails"]


class Writer:
    """A teacher backend that writes what `answer(prompt_text, seed)` says, ending it with a stop token."""

    name = "fake"

    def __init__(self, tok, answer):
        self.tok, self.answer, self.calls = tok, answer, []

    def generate_topk(self, prompts, k, sampling, seeds):
        self.calls.append(list(seeds))
        out = []
        for p, s in zip(prompts, seeds):
            text = self.answer(self.tok.decode(p), s)
            stop = [] if text.endswith("<cut>") else [sampling.stop_ids[0]]
            ids = self.tok(text.removesuffix("<cut>"), add_special_tokens=False).input_ids + stop
            out.append(Generated(ids, torch.zeros(len(ids), k, dtype=torch.long), torch.zeros(len(ids), k),
                                 torch.zeros(len(ids))))
        return out

    def close(self):
        pass


def use_writer(monkeypatch, answer):
    import distill.teacher.backend as backend

    made = []

    def make(name, spec, model_path, k, tok=None, vocab_rows=None):
        made.append(Writer(tok, answer))
        return made[-1]

    monkeypatch.setattr(backend, "make_backend", make)
    return made


def seeded_answer(prompt: str, seed: int) -> str:
    """A different text for every (prompt, seed), built from the prompt's own words."""
    words = prompt.split()
    rng = random.Random(f"{seed}|{prompt}")
    return " ".join(rng.choice(words) for _ in range(6))


@pytest.fixture
def setup(tmp_path, smollm2_dir):
    data = write_class_data(tmp_path / "d.jsonl")
    held = tmp_path / "test.jsonl"
    held.write_text("".join(json.dumps({"text": t, "label": "billing"}) + "\n" for t in HOLDOUT_FILE_TEXTS))
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", smollm2_dir)
    return tmp_path, recipe, held


def load(recipe, *sets):
    return load_recipe(recipe, ["write_texts.batch_size=4", *sets])


def written(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_clean_text_keeps_one_line_and_drops_empty_and_cut_answers():
    assert wt.clean_text('Here is one:\n- "Where  is my\tparcel?"\nmore', True, 100) == ("Where is my parcel?", None)
    assert wt.clean_text("1. my card was declined", True, 100) == ("my card was declined", None)
    assert wt.clean_text("  \n ", True, 100) == (None, "empty")
    assert wt.clean_text("`", True, 100) == (None, "empty") and wt.clean_text('"..."', True, 100) == (None, "empty")
    assert wt.clean_text("a text the token limit cut", False, 100) == (None, "overlong")
    assert wt.clean_text("a whole line\nand the start of another", False, 100) == ("a whole line", None)
    assert wt.clean_text("x" * 101, True, 100) == (None, "overlong")


def test_no_written_text_equals_a_text_of_any_split_or_another_written_text(setup, monkeypatch):
    tmp, recipe, held = setup
    r = load(recipe, f"task.holdout_data={held}", "task.split.holdout=0", "write_texts.count=9")
    splits = prepare_splits(r.task, None, write=False)
    train, val = splits.train[0]["text"], splits.validation[0]["text"]
    # rounds of 4 answers: the 16 below end the third round with 9 kept
    script = iter([f"  {HOLDOUT_FILE_TEXTS[0].upper()}  ", f"- {val.title()}", f'"{train}"', FRESH[0],
                   FRESH[0].upper(), "", "a long answer the limit cut<cut>", FRESH[1], f"{HOLDOUT_FILE_TEXTS[1]}\n"]
                  + FRESH[2:] + EXTRA)
    use_writer(monkeypatch, lambda prompt, seed: next(script))
    path = wt.run_write_texts(r, backend="transformers")
    texts = written(path)
    assert texts == FRESH + EXTRA
    every = [t for s in (splits.train, splits.validation) for t in (ex["text"] for ex in s)] + HOLDOUT_FILE_TEXTS
    assert not {normalize_text(t) for t in texts} & {normalize_text(t) for t in every}
    assert len({normalize_text(t) for t in texts}) == len(texts)
    m = json.loads((path.parent / "manifest.json").read_text())
    assert m["kept"] == 9 and m["dropped"] == {"empty": 1, "overlong": 1, "duplicate": 1, "in_train": 1,
                                              "in_validation": 1, "in_holdout": 2}
    assert m["identity"]["instruction"] == r.write_texts.instruction and m["identity"]["teacher"]


def test_the_split_holdout_is_excluded_too_and_prompts_show_training_texts_only(setup, monkeypatch):
    tmp, recipe, _ = setup
    r = load(recipe, "write_texts.count=1", "write_texts.examples_per_prompt=3")
    splits = prepare_splits(r.task, None, write=False)
    hold = splits.holdout[0]["text"]
    prompts = []

    def answer(prompt, seed):
        prompts.append(prompt)
        return hold.upper() if len(prompts) == 1 else FRESH[len(prompts)]

    use_writer(monkeypatch, answer)
    texts = written(wt.run_write_texts(r, backend="transformers"))
    assert normalize_text(hold) not in map(normalize_text, texts) and texts
    train = {ex["text"] for ex in splits.train}
    shown = [line[2:] for p in prompts for line in p.splitlines() if line.startswith("- ")]
    assert shown and set(shown) <= train  # per_label: a class's texts, 3 a prompt
    assert all(sum(line.startswith("- ") for line in p.splitlines()) == 3 for p in prompts)


def test_the_same_seed_gives_the_same_texts_and_runs_continue(setup, monkeypatch):
    tmp, recipe, _ = setup
    use_writer(monkeypatch, seeded_answer)
    a = written(wt.run_write_texts(load(recipe, "write_texts.count=10"), out=tmp / "a"))
    assert len(a) >= 10 and len(set(a)) == len(a)
    assert written(wt.run_write_texts(load(recipe, "write_texts.count=10"), out=tmp / "b")) == a
    assert written(wt.run_write_texts(load(recipe, "write_texts.count=10", "write_texts.seed=1"), out=tmp / "c")) != a
    # in steps: 3 texts, then on to 10, is the run that wrote 10 at once; a run with enough kept does nothing
    wt.run_write_texts(load(recipe, "write_texts.count=3"), out=tmp / "d")
    assert 3 <= len(written(tmp / "d" / "texts.jsonl")) < len(a)
    made = use_writer(monkeypatch, seeded_answer)
    assert written(wt.run_write_texts(load(recipe, "write_texts.count=10"), out=tmp / "d")) == a
    assert written(wt.run_write_texts(load(recipe, "write_texts.count=10"), out=tmp / "d")) == a
    assert len(made) == 1  # the last run loaded no teacher
    with pytest.raises(UsageError, match="other settings.*instruction"):
        wt.run_write_texts(load(recipe, "write_texts.count=20", "write_texts.instruction=Other."), out=tmp / "d")


def test_a_killed_round_is_written_again(setup, monkeypatch):
    tmp, recipe, _ = setup
    use_writer(monkeypatch, seeded_answer)
    full = written(wt.run_write_texts(load(recipe, "write_texts.count=8"), out=tmp / "a"))
    wt.run_write_texts(load(recipe, "write_texts.count=4"), out=tmp / "b")
    with open(tmp / "b" / "texts.jsonl", "a") as f:  # a round's lines appended, its manifest never written
        f.write(json.dumps({"text": "left by a kill", "prompt": 99, "round": 9}) + "\n{\"text\": \"cut of")
    assert written(wt.run_write_texts(load(recipe, "write_texts.count=8"), out=tmp / "b")) == full


def test_the_transformers_backend_writes_the_same_texts_for_the_same_seed(tmp_path, smollm2_dir):
    model = make_tiny_untied(tmp_path / "m", smollm2_dir, 1, 0, 0.3)
    recipe = write_recipe(tmp_path / "r.yaml", write_class_data(tmp_path / "d.jsonl"), tmp_path / "w", model)
    sets = ["write_texts.count=8", "write_texts.max_new_tokens=12", "write_texts.max_prompts=8"]
    a = wt.run_write_texts(load(recipe, *sets), backend="transformers", out=tmp_path / "a")
    wt.run_write_texts(load(recipe, *sets[:2], "write_texts.max_prompts=4"), backend="transformers", out=tmp_path / "b")
    b = wt.run_write_texts(load(recipe, *sets), backend="transformers", out=tmp_path / "b")
    ma, mb = (json.loads((p.parent / "manifest.json").read_text()) for p in (a, b))
    assert a.read_text() == b.read_text() and ma == mb
    assert ma["prompts"] == 8 and ma["kept"] + sum(ma["dropped"].values()) == 8


# --- the pool ------------------------------------------------------------------------------------------


def write_file(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_joining_adds_unlabelled_rows_unlike_every_split(setup):
    tmp, recipe, held = setup
    base = load(recipe, f"task.holdout_data={held}", "task.split.holdout=0")
    splits = prepare_splits(base.task, None, write=False)
    leaks = [HOLDOUT_FILE_TEXTS[0].title(), f" {splits.validation[1]['text'].upper()} ", splits.train[2]["text"]]
    path = write_file(tmp / "texts.jsonl", FRESH[:3] + leaks + [FRESH[0].upper()] + FRESH[3:])
    r = load(recipe, f"task.holdout_data={held}", "task.split.holdout=0", f"task.written_data={path}")
    joined = wp.join_written(r, prepare_splits(r.task, None, write=False))
    n = len(splits.train)
    assert joined.train[:n] == splits.train and [ex["text"] for ex in joined.train[n:]] == FRESH
    assert all(ex["label"] is None and wp.is_written(ex) for ex in joined.train[n:])
    assert joined.fingerprint != splits.fingerprint and joined.validation == splits.validation
    assert wp.join_written(base, splits) is splits  # no written_data: nothing changes


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0, None])
def test_the_share_is_honoured_nested_and_never_labelled(setup, share):
    tmp, recipe, _ = setup
    path = write_file(tmp / "texts.jsonl", [f"written text number {i}" for i in range(40)])
    sets = [f"task.written_data={path}"] + ([] if share is None else [f"task.written_share={share}"])
    r = load(recipe, *sets)
    joined = wp.join_written(r, prepare_splits(r.task, None, write=False))
    n = wp.data_rows(joined)
    rows = wp.train_rows(r.task, joined)
    assert rows[:n] == list(range(n)) and len(rows) - n == round(40 * (1.0 if share is None else share))
    if share:
        smaller = wp.train_rows(load(recipe, *sets[:1], f"task.written_share={share / 2}").task, joined)
        assert set(smaller) <= set(rows)
    assert wp.labelled_rows(r.task, joined) == list(range(n))
    budget = load(recipe, *sets, "task.labelled_examples=6")
    base = prepare_splits(budget.task, None, write=False)
    assert wp.labelled_rows(budget.task, joined) == labelled_indices(budget.task, base)


def test_generate_scores_every_written_text(setup, tiny_model):
    import distill.cache.generate as gen
    from distill.cache import store

    tmp, recipe, _ = setup
    path = write_file(tmp / "texts.jsonl", FRESH)
    r = load_recipe(recipe, [f"teacher={tiny_model}", f"task.written_data={path}", "task.written_share=0.5"])
    cache = gen.run_generate(r, backend="transformers")
    joined = wp.join_written(r, prepare_splits(r.task, None, write=False))
    assert store.read_manifest(cache).data_fingerprint == joined.fingerprint
    assert store.load_split(cache, "train", len(joined.train))["label_logprobs"].shape[0] == len(joined.train)


def test_recipe_checks(setup):
    tmp, recipe, _ = setup
    with pytest.raises(UsageError, match="written_share.*written_data"):
        load(recipe, "task.written_share=0.5")
    with pytest.raises(UsageError, match="expected a number in \\[0, 1\\]"):
        load(recipe, "task.written_data=x.jsonl", "task.written_share=2")
    with pytest.raises(UsageError, match="train_examples"):
        load(recipe, "task.written_data=x.jsonl", "train.train_examples=4")
    with pytest.raises(UsageError, match="no such file"):
        r = load(recipe, f"task.written_data={tmp / 'missing.jsonl'}")
        wp.join_written(r, prepare_splits(r.task, None, write=False))
