"""Caches from several teachers (recipe `teachers:`, cache/ensemble.py): the soft-label mixture is the
weighted average of the teachers' distributions, the top-k mixture is the exact one where k is the
vocabulary, a routed row holds its own teacher's numbers only, adding a teacher rescores no other, and
teachers that disagree on tokenizer, label set or data are refused. Tiny random llamas, transformers."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from conftest import GEN_ROWS, make_tiny_llama, write_class_data, write_recipe

from distill.cache import ensemble
from distill.cache import store as cache_mod
from distill.config import load_recipe
from distill.errors import UsageError
from distill.fileio import check_output_dir
from distill.train.losses import dense_kd, sparse_kd


def direct_mixture(scores: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_t w_t p_t computed the plain way, in float64: each teacher's softmax, averaged with the weights."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    probs = [torch.exp(s.double() - torch.logsumexp(s.double(), -1, keepdim=True)) for s in scores]
    return sum(wi * p for wi, p in zip(w, probs))


def test_soft_label_mixture_is_the_weighted_average_of_the_teachers_probabilities():
    torch.manual_seed(0)
    scores = [torch.randn(7, 5) * 3 - 4 for _ in range(3)]  # unnormalised answer log-probs, as cached
    scores[1][2, 4] = float("-inf")  # a label one teacher gives probability 0
    weights = [1.0, 2.0, 0.5]
    got = ensemble.mix_soft_labels(scores, [w / 3.5 for w in weights]).double().exp()
    assert torch.allclose(got, direct_mixture(scores, weights), atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-6)
    # not the average of log-probabilities (a geometric mixture): the two differ on these rows
    geometric = torch.softmax(sum(w / 3.5 * torch.log_softmax(s, -1) for w, s in zip(weights, scores)), -1)
    assert not torch.allclose(got.float(), geometric, atol=1e-3)


def full_topk(logits: torch.Tensor, k: int):
    """A teacher's top k of full distributions [N, V], as a backend caches them: ids in rank order,
    log-probabilities, and the mass outside them."""
    logp = torch.log_softmax(logits.double(), -1)
    lps, ids = logp.topk(k, -1)
    tail = (1 - lps.exp().sum(-1)).clamp_min(0)
    return ids.int(), lps.float(), tail.float()


def test_topk_mixture_with_k_the_vocabulary_is_the_exact_mixture():
    torch.manual_seed(1)
    n, vocab, weights = 6, 40, [0.5, 0.3, 0.2]
    logits = [torch.randn(n, vocab) * 2.5 for _ in weights]
    ids, lps, tail = ensemble.mix_topk(*zip(*[full_topk(x, vocab) for x in logits]), weights)
    assert ids.shape == (n, vocab) and bool((tail < 1e-5).all())
    dense = torch.full((n, vocab), float("-inf"), dtype=torch.float64).scatter(1, ids.long(), lps.double())
    exact = direct_mixture(logits, weights)
    assert torch.allclose(dense.exp(), exact, atol=1e-6)
    assert bool((lps[:, :-1] >= lps[:, 1:]).all())  # rank order, as a cache holds it
    # the loss the student trains on is the dense divergence from the exact mixture
    student = torch.randn(n, vocab)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        a = sparse_kd(student, ids, lps, tail, 1.0, kind, reduction="none")
        b = dense_kd(student, exact.log().float(), 1.0, kind, reduction="none")
        assert torch.allclose(a, b, atol=1e-4), kind


def test_topk_mixture_keeps_each_teachers_tail_whole_over_the_union_of_supports():
    torch.manual_seed(2)
    n, vocab, k, weights = 5, 30, 4, [0.25, 0.75]
    logits = [torch.randn(n, vocab) * 2 for _ in weights]
    rows = [full_topk(x, k) for x in logits]
    rows[1][2][3] += rows[1][1][3, 2:].exp().sum()  # a backend's filler: two slots with no entry, their mass
    rows[1][1][3, 2:] = float("-inf")  # in the tail
    ids, lps, tail = ensemble.mix_topk(*zip(*rows), weights)
    for r in range(n):
        live = [{int(i): float(lp) for i, lp in zip(t_ids[r], t_lps[r]) if lp > float("-inf")}
                for t_ids, t_lps, _ in rows]
        got = {int(i): float(lp) for i, lp in zip(ids[r], lps[r]) if lp > float("-inf")}
        assert set(got) == set(live[0]) | set(live[1])  # the union of the supports, filler dropped
        for i, lp in got.items():  # each teacher's own probability where it ranked the id, nothing where not
            want = sum(w * torch.tensor(t[i]).exp().item() for w, t in zip(weights, live) if i in t)
            assert torch.tensor(lp).exp().item() == pytest.approx(want, rel=1e-5)
        want_tail = sum(w * float(t[2][r]) for w, t in zip(weights, rows))
        assert float(tail[r]) == pytest.approx(want_tail, rel=1e-5)
        total = sum(torch.tensor(v).exp().item() for v in got.values()) + float(tail[r])
        assert total == pytest.approx(1.0, abs=1e-5)


def test_route_rows_takes_each_rows_own_teacher():
    a, b = torch.zeros(4, 3), torch.ones(4, 3)
    assert ensemble.route_rows([a, b], [1, 0, 0, 1])[:, 0].tolist() == [1, 0, 0, 1]
    assert ensemble.route_rows([["a0", "a1"], ["b0", "b1"]], [1, 0]) == ["b0", "a1"]


# -- soft-label caches of several teachers, end to end ------------------------------------------------------


def teacher_recipe(tmp, base, teachers, *sets):
    """The classification recipe of conftest with `teachers:`; rows alternate between teachers a and b in
    the data's `teacher` field (routing's)."""
    path = tmp / f"r-{len(list(tmp.glob('r-*.yaml')))}.yaml"
    r = yaml.safe_load(base.read_text())
    r["teachers"] = teachers
    path.write_text(yaml.safe_dump(r))
    return load_recipe(path, list(sets))


def shard_files(cache_dir):
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in cache_dir.glob("*.safetensors")}


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, smollm2_dir):
    """Teacher a generated alone, then b added: the cache, the shards of a before b came, and the recipes."""
    tmp = tmp_path_factory.mktemp("multi")
    a = make_tiny_llama(tmp / "a", smollm2_dir, layers=1, seed=1)
    b = make_tiny_llama(tmp / "b", smollm2_dir, layers=1, seed=2)
    data = write_class_data(tmp / "d.jsonl")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "teacher": "ab"[i % 2]}) + "\n" for i, r in enumerate(rows)))
    base = write_recipe(tmp / "base.yaml", data, tmp / "w", a, student={"num_layers": 1})
    only_a = teacher_recipe(tmp, base, [{"spec": a, "name": "a"}])
    cache = ensemble.run_generate_teachers(only_a, backend="transformers")
    before = shard_files(ensemble.teacher_dir(cache, "a"))
    both = [{"spec": a, "name": "a", "weight": 3.0}, {"spec": b, "name": "b", "weight": 1.0}]
    ensemble.run_generate_teachers(teacher_recipe(tmp, base, both), backend="transformers")
    return {"tmp": tmp, "base": base, "cache": cache, "before": before, "teachers": both}


def test_adding_a_teacher_rescores_no_other(two_teachers):
    cache = two_teachers["cache"]
    assert shard_files(ensemble.teacher_dir(cache, "a")) == two_teachers["before"]  # same bytes, never rewritten
    assert shard_files(ensemble.teacher_dir(cache, "b"))
    top = cache_mod.read_manifest(cache)
    assert sorted(top.teachers) == ["a", "b"] and not top.shards
    assert all(t["complete"] == {"train": True, "validation": True} for t in top.teachers.values())
    with pytest.raises(UsageError, match="split 'train' is incomplete"):  # no one-teacher reader takes it
        cache_mod.load_split(cache, "train")
    check_output_dir(cache, "--out", "cache")  # `distill generate --out CACHE` runs again on it


def parts_of(recipe):
    from distill.train.setup import build_parts

    return build_parts(recipe)


def test_training_reads_the_mixture_of_the_teachers_distributions(two_teachers):
    recipe = teacher_recipe(two_teachers["tmp"], two_teachers["base"], two_teachers["teachers"])
    parts = parts_of(recipe)
    cache, n = two_teachers["cache"], len(parts.splits.train)
    scores = [cache_mod.load_split(ensemble.teacher_dir(cache, t), "train", n)["label_logprobs"] for t in "ab"]
    assert not torch.allclose(scores[0], scores[1], atol=1e-3)  # two teachers that disagree
    got = torch.softmax(parts.task.teacher.double(), -1)  # what the loss reads (at T = 1)
    assert torch.allclose(got, direct_mixture(scores, [3.0, 1.0]), atol=1e-5)
    assert parts.task.teacher_val is not None
    kd, _ = parts.task.loss_sums(parts.model, [0, 1, 2], {})
    assert torch.isfinite(kd) and kd.item() > 0


def test_a_routed_row_reads_its_own_teachers_numbers_only(two_teachers):
    recipe = teacher_recipe(two_teachers["tmp"], two_teachers["base"], two_teachers["teachers"],
                            "train.teacher_mix=route", "task.teacher_field=teacher")
    parts = parts_of(recipe)
    cache, splits = two_teachers["cache"], parts.splits
    with open(recipe.task.data) as f:
        data = {r["text"]: r["teacher"] for r in map(json.loads, f)}
    for split, got in (("train", parts.task.teacher), ("validation", parts.task.teacher_val)):
        examples = splits.get(split)
        own = {t: cache_mod.load_split(ensemble.teacher_dir(cache, t), split, len(examples))["label_logprobs"]
               for t in "ab"}
        assert {data[ex["text"]] for ex in examples} == {"a", "b"}
        for i, ex in enumerate(examples):
            mine, other = data[ex["text"]], "b" if data[ex["text"]] == "a" else "a"
            assert torch.equal(got[i], own[mine][i]), (split, i)
            assert not torch.allclose(got[i], own[other][i], atol=1e-4), (split, i)


def test_routing_refuses_a_row_naming_no_teacher(two_teachers):
    recipe = teacher_recipe(two_teachers["tmp"], two_teachers["base"], two_teachers["teachers"],
                            "train.teacher_mix=route", "task.teacher_field=teacher")
    with open(recipe.task.data) as f:
        first = json.loads(f.readline())
    assert first["teacher"] == "a"
    with pytest.raises(UsageError, match="'teacher': 'a', no teacher of the recipe"):
        ensemble.row_teachers(recipe.task, [{"text": first["text"]}], ["b"])
    with pytest.raises(UsageError, match="'teacher': no value"):
        ensemble.row_teachers(recipe.task, [{"text": "a text the data does not have"}], ["a", "b"])


@pytest.mark.parametrize("field, value, what", [
    ("labels", ["delivery", "billing", "login"], "the label set"),
    ("data_fingerprint", "0123456789abcdef", "the data fingerprint"),
])
def test_teachers_that_disagree_on_labels_or_data_are_refused(two_teachers, field, value, what):
    cache = two_teachers["cache"]
    b_dir = ensemble.teacher_dir(cache, "b")
    saved = (b_dir / "manifest.json").read_bytes()
    m = cache_mod.read_manifest(b_dir)
    setattr(m, field, value)  # as if b had been generated elsewhere for other labels or data
    cache_mod.write_manifest(b_dir, m)
    try:
        recipe = teacher_recipe(two_teachers["tmp"], two_teachers["base"], two_teachers["teachers"])
        with pytest.raises(UsageError, match=f"teachers 'a' and 'b' disagree on {what}"):
            ensemble.run_generate_teachers(recipe, backend="transformers")
        with pytest.raises(UsageError, match=f"teachers 'a' and 'b' disagree on {what}"):
            parts_of(recipe)
    finally:
        (b_dir / "manifest.json").write_bytes(saved)


def test_recipe_keys_of_several_teachers_are_checked(two_teachers):
    tmp, base = two_teachers["tmp"], two_teachers["base"]
    with pytest.raises(UsageError, match="the name 'x' is given to two teachers"):
        teacher_recipe(tmp, base, [{"spec": "m1", "name": "x"}, {"spec": "m2", "name": "x"}])
    with pytest.raises(UsageError, match="teacher_mix: route .* needs"):
        teacher_recipe(tmp, base, [{"spec": "m1"}], "train.teacher_mix=route")
    with pytest.raises(UsageError, match="teachers\\[0\\].weight"):
        teacher_recipe(tmp, base, [{"spec": "m1", "weight": 0}])
    assert teacher_recipe(tmp, base, [{"spec": "teachers/big.yaml"}]).teachers[0].key == "big"


# -- top-k caches of several teachers ----------------------------------------------------------------------


def test_topk_teachers_mix_on_real_caches_and_another_tokenizer_is_refused(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    a = make_tiny_llama(tmp_path / "a", smollm2_dir, layers=1, seed=3)
    b = make_tiny_llama(tmp_path / "b", smollm2_dir, layers=1, seed=4)
    c = make_tiny_llama(tmp_path / "c", smollm2_dir, layers=1, seed=5, extra_rows=1)
    tok = AutoTokenizer.from_pretrained(c)
    tok.add_tokens(["<only-in-c>"])  # a vocabulary of one more token: another tokenizer hash
    tok.save_pretrained(c)
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    r = {"workdir": str(tmp_path / "w"), "teacher": a,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 64},
         "generate": {"k": 4, "batch_size": 4, "shard_size": 4, "responses": "data"},
         "teachers": [{"spec": a, "name": "a"}, {"spec": b, "name": "b"}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(r))
    cache = ensemble.run_generate_teachers(load_recipe(tmp_path / "g.yaml"), backend="transformers")
    da, db = (cache_mod.load_split(ensemble.teacher_dir(cache, t), "train") for t in "ab")
    ea, eb = cache_mod.example_topk(da, 0), cache_mod.example_topk(db, 0)
    mixed = ensemble.mix_topk_examples([ea, eb], [0.5, 0.5])
    assert torch.equal(mixed.sequence, ea.sequence) and mixed.topk_ids.shape[0] == len(ea.positions)
    for pos in range(len(ea.positions)):
        union = set(ea.topk_ids[pos].tolist()) | set(eb.topk_ids[pos].tolist())
        assert set(mixed.topk_ids[pos][~torch.isneginf(mixed.topk_logprobs[pos])].tolist()) == union
    assert torch.allclose(mixed.tail_mass, 0.5 * (ea.tail_mass + eb.tail_mass))
    r["teachers"].append({"spec": c, "name": "c"})
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(r))
    with pytest.raises(UsageError, match="teachers 'a' and 'c' disagree on the tokenizer"):
        ensemble.run_generate_teachers(load_recipe(tmp_path / "g.yaml"), backend="transformers")
    with pytest.raises(UsageError, match="teachers 'a' and 'c' disagree on the tokenizer"):  # and stays refused
        ensemble.run_generate_teachers(load_recipe(tmp_path / "g.yaml"), only="a", backend="transformers")


def test_eval_of_several_models_scores_the_mean_of_their_probabilities(two_teachers):
    """`distill eval A B`: the ensemble's predictions are the equal-weight mixture of the two models' own
    eval probabilities, and its report names both."""
    from distill.evaluate.evaluation import run_eval

    base, tmp = load_recipe(two_teachers["base"]), two_teachers["tmp"]
    a, b = (t["spec"] for t in two_teachers["teachers"])
    alone = [run_eval(m, base, out=str(tmp / f"eval-{n}"), name=n) for m, n in ((a, "a"), (b, "b"))]
    both = run_eval([a, b], base, out=str(tmp / "eval-ab"))
    assert both["name"] == "ensemble" and both["model"] == [a, b] and both["runtime"] == "ensemble"
    probs = [[json.loads(x)["probs"] for x in (tmp / f"eval-{n}" / "predictions.jsonl").read_text().splitlines()]
             for n in ("a", "b", "ab")]
    mixed = (torch.tensor(probs[0], dtype=torch.float64) + torch.tensor(probs[1], dtype=torch.float64)) / 2
    assert not torch.allclose(torch.tensor(probs[0]), torch.tensor(probs[1]), atol=1e-2)
    assert torch.allclose(torch.tensor(probs[2], dtype=torch.float64), mixed, atol=2e-4)  # 4-decimal rounding
    assert both["parameters"] == alone[0]["parameters"] + alone[1]["parameters"]


def test_a_teachers_cache_brought_from_elsewhere_is_taken_as_is(two_teachers, tmp_path):
    """CACHE/teachers/a copied in before the cache's first `distill generate` (the cache has no manifest of
    its own yet): generate accepts the directory, scores only b, and a's shards keep their bytes."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(ensemble.teacher_dir(two_teachers["cache"], "a"), ensemble.teacher_dir(cache, "a"))
    before = shard_files(ensemble.teacher_dir(cache, "a"))
    check_output_dir(cache, "--out", "cache")
    recipe = teacher_recipe(two_teachers["tmp"], two_teachers["base"], two_teachers["teachers"])
    ensemble.run_generate_teachers(recipe, backend="transformers", out=str(cache))
    assert shard_files(ensemble.teacher_dir(cache, "a")) == before
    assert sorted(cache_mod.read_manifest(cache).teachers) == ["a", "b"]
    other = tmp_path / "other" / "teachers"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("a user's file")  # a `teachers/` not of teachers' caches: refused
    with pytest.raises(UsageError, match="did not write"):
        check_output_dir(other.parent, "--out", "cache")


def test_a_generation_student_trains_on_its_teachers_topk_mixed_or_routed(tmp_path, smollm2_dir):
    """Top-k caches of two teachers feed GenerationTask: mixture = mix_topk_examples of the two caches' rows,
    route = each row's own teacher's row and never the other's; a training step runs on each."""
    from distill.train import run_train
    from distill.train.setup import build_parts

    a = make_tiny_llama(tmp_path / "a", smollm2_dir, layers=1, seed=6)
    b = make_tiny_llama(tmp_path / "b", smollm2_dir, layers=1, seed=7)
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({**r, "teacher": "ab"[i % 2]}) + "\n" for i, r in enumerate(GEN_ROWS)))
    r = {"workdir": str(tmp_path / "w"), "teacher": a,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 64},
         "generate": {"k": 4, "batch_size": 4, "shard_size": 4, "responses": "data"},
         "train": {"alpha": 0.5, "epochs": 1, "batch_size": 2, "lr": 1e-3, "student": {"num_layers": 1}},
         "teachers": [{"spec": a, "name": "a", "weight": 3.0}, {"spec": b, "name": "b"}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(r))
    mixed_recipe = load_recipe(tmp_path / "g.yaml")
    cache = ensemble.run_generate_teachers(mixed_recipe, backend="transformers")
    own = {t: cache_mod.load_split(ensemble.teacher_dir(cache, t), "train") for t in "ab"}
    n = len(own["a"]["index"])
    rows = {t: [cache_mod.example_topk(own[t], i) for i in range(n)] for t in "ab"}

    def same(x, y):
        ix, iy = x.topk_ids.long().sort(-1), y.topk_ids.long().sort(-1)  # the stream keeps the codec's order
        return (torch.equal(x.sequence.long(), y.sequence.long()) and torch.equal(ix.values, iy.values)
                and torch.allclose(x.topk_logprobs.float().gather(-1, ix.indices),
                                   y.topk_logprobs.float().gather(-1, iy.indices)))

    parts = build_parts(mixed_recipe)
    got = parts.task.train.examples(list(range(n)))
    for i in range(n):
        want = ensemble.mix_topk_examples([rows["a"][i], rows["b"][i]], [0.75, 0.25])
        assert same(got[i], want) and not same(got[i], rows["a"][i])
    route = ["train.teacher_mix=route", "task.teacher_field=teacher"]
    routed = load_recipe(tmp_path / "g.yaml", route)
    parts = build_parts(routed)
    names = ensemble.row_teachers(routed.task, parts.splits.train, ["a", "b"])
    assert set(names) == {0, 1}
    got = parts.task.train.examples(list(range(n)))
    for i, t in enumerate(names):
        assert same(got[i], rows["ab"[t]][i]) and not same(got[i], rows["ab"[1 - t]][i])
    for sets, out in (([], "mixed"), (route, "routed")):
        run_train(load_recipe(tmp_path / "g.yaml", sets + ["train.max_steps=2"]), out=str(tmp_path / out))
        assert json.loads((tmp_path / out / "training.json").read_text())["steps"] == 2
