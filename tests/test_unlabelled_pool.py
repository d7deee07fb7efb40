"""The unlabelled pool (task.labelled_examples): the teacher's soft labels on every training text, gold
labels only on the labelled budget. Tiny random llama with the real tokenizer."""
import pytest
from conftest import write_class_data, write_recipe

from distill.config import load_recipe
from distill.data.sampling import subset_indices
from distill.data.splits import labelled_indices, prepare_splits
from distill.errors import UsageError


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model):
    from distill.cache.generate import run_generate

    tmp = tmp_path_factory.mktemp("pool")
    data = write_class_data(tmp / "d.jsonl")
    recipe = write_recipe(tmp / "r.yaml", data, tmp / "w", tiny_model, student={"num_layers": 1})
    run_generate(load_recipe(recipe, ["task.labelled_examples=6"]), backend="transformers")
    return recipe


def task_of(recipe, *sets):
    from distill.train.setup import build_parts

    return build_parts(load_recipe(recipe, ["task.labelled_examples=6", *sets]))


def test_the_budget_is_the_labelled_subset_and_leaves_splits_and_cache_alone(pool):
    r, budget = load_recipe(pool), load_recipe(pool, ["task.labelled_examples=6"])
    a, b = prepare_splits(r.task, r.workdir), prepare_splits(budget.task, budget.workdir)
    assert a.fingerprint == b.fingerprint  # the cache of every text serves both
    assert labelled_indices(budget.task, b) == subset_indices(b.train, 6, 0)  # what train.train_examples: 6 draws
    assert labelled_indices(r.task, a) is None


def test_supervised_training_reads_only_the_labelled_texts(pool):
    parts = task_of(pool, "train.alpha=0")
    splits = parts.splits
    want = [splits.train[i]["text"]
            for i in labelled_indices(load_recipe(pool, ["task.labelled_examples=6"]).task, splits)]
    assert len(parts.task.train) == 6 and bool(parts.task.has_label.all())
    got = parts.tok.batch_decode([e.prompt for e in parts.task.train])
    assert all(w in g for w, g in zip(want, got))


def test_distillation_has_kd_on_every_text_and_ce_on_the_budget_alone(pool):
    parts = task_of(pool)
    task, n = parts.task, len(parts.splits.train)
    assert len(task.train) == n and task.teacher.shape[0] == n and int(task.has_label.sum()) == 6
    idx = list(range(n))
    kd, ce = task.loss_sums(parts.model, idx, {})
    scores, each = task.scores_and_ce(parts.model, task.train, task.gold)
    assert ce.item() == pytest.approx(each[task.has_label].sum().item(), rel=1e-5)
    unlabelled = [i for i in idx if not task.has_label[i]]
    task.gold[unlabelled] = (task.gold[unlabelled] + 1) % 3  # their gold labels are never read
    assert task.loss_sums(parts.model, idx, {})[1].item() == pytest.approx(ce.item(), rel=1e-5)
    assert kd.item() > 0


def test_the_budget_is_refused_beside_train_examples(pool):
    with pytest.raises(UsageError, match="labelled_examples"):
        load_recipe(pool, ["task.labelled_examples=6", "train.train_examples=6"])
