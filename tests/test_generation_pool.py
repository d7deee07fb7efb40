"""The labelled budget of a generation task (task.labelled_examples with task.stratify_field): a stratified
sample keeps its gold responses, every other training response is withheld before anything is written, the
teacher writes those in `distill generate`, and each training mode reads what it may. Tiny random llama with
the real tokenizer."""
import json
from collections import Counter

import pytest
import yaml

from distill.config import load_recipe
from distill.data.splits import labelled_indices, prepare_splits

INTENTS = ("Play", "Book", "Rate")


def write_rows(path, n_per=12):
    rows = []
    for c in INTENTS:
        for i in range(n_per):
            rows.append({"prompt": f"{c.lower()} item number {i} please",
                         "response": json.dumps({"intent": c, "slots": {"n": str(i)}}), "intent": c})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model):
    from distill.cache.generate import run_generate

    tmp = tmp_path_factory.mktemp("genpool")
    data = write_rows(tmp / "d.jsonl")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "genpool", "workdir": str(tmp / "w"), "teacher": tiny_model,
        "task": {"type": "generation", "data": str(data), "output": "json", "class_field": "intent",
                 "stratify_field": "intent", "labelled_examples": 6, "max_length": 64,
                 "split": {"validation": 0.25, "holdout": 0.0, "seed": 0}},
        "generate": {"k": 4, "batch_size": 8, "temperature": 0.0, "max_new_tokens": 6},
        "train": {"alpha": 0.5, "epochs": 1, "batch_size": 4, "student": {"num_layers": 1}}}))
    run_generate(load_recipe(recipe), backend="transformers")
    return recipe


def test_the_budget_is_stratified_and_the_pool_has_no_gold_response(pool):
    r = load_recipe(pool)
    splits = prepare_splits(r.task, r.workdir, write=False)
    budget = labelled_indices(r.task, splits)
    assert Counter(splits.train[i]["group"] for i in budget) == Counter({c: 2 for c in INTENTS})
    assert [i for i, ex in enumerate(splits.train) if ex["response"] is not None] == budget
    assert all(ex["response"] is not None for ex in splits.validation)  # validation is scored against gold
    written = (r.workdir_path / "data" / "train.jsonl").read_text()
    pool_prompts = [ex["prompt"] for i, ex in enumerate(splits.train) if i not in budget]
    gold = {json.loads(line)["prompt"]: json.loads(line)["response"] for line in open(r.task.data)}
    assert all(gold[p] not in written for p in pool_prompts)  # no stage can read a withheld response


def test_the_teacher_writes_the_pool_and_scores_the_budgets_gold(pool):
    from distill.train.setup import build_parts

    r = load_recipe(pool)
    parts = build_parts(r)
    splits, tok = parts.splits, parts.tok
    budget = set(labelled_indices(r.task, splits))
    rows = [parts.task.train[i] for i in range(len(splits.train))]
    for i, (ex, row) in enumerate(zip(splits.train, rows)):
        response = tok.decode(row.sequence[row.positions], skip_special_tokens=True)
        if i in budget:
            assert response == ex["response"]
        else:  # the tiny random teacher's greedy text, never the gold JSON
            gold = [json.loads(line)["response"] for line in open(r.task.data)
                    if json.loads(line)["prompt"] == ex["prompt"]][0]
            assert response != gold


def test_each_training_mode_reads_what_it_may(pool):
    from distill.train.setup import build_parts

    r = load_recipe(pool)
    n = len(prepare_splits(r.task, r.workdir, write=False).train)
    control = build_parts(load_recipe(pool, ["train.alpha=0"])).task
    assert len(control.train) == 6  # the labelled budget's gold responses alone
    seqkd = build_parts(load_recipe(pool, ["train.alpha=0", "train.sequence_kd=true"])).task
    assert len(seqkd.train) == n and not seqkd.teacher_val_available
    kd, ce = seqkd.loss_sums(build_parts(load_recipe(pool, ["train.alpha=0", "train.sequence_kd=true"])).model,
                             list(range(4)), {})
    assert kd.item() == 0 and ce.item() > 0  # text alone, no log-probabilities


def test_sequence_kd_needs_alpha_zero_and_a_generation_task(pool):
    from distill.errors import UsageError

    with pytest.raises(UsageError, match="train.sequence_kd"):
        load_recipe(pool, ["train.sequence_kd=true"])


def test_few_shot_examples_come_from_the_budget_one_per_intent(pool):
    from distill.evaluate.evaluation import few_shot_examples

    r = load_recipe(pool)
    splits = prepare_splits(r.task, r.workdir, write=False)
    shots = few_shot_examples(splits.train, None, 3)
    assert sorted(s["group"] for s in shots) == sorted(INTENTS)
    assert all(s["response"] is not None for s in shots)
