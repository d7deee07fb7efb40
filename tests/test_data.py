"""Data layer and configs: deterministic stratified splits, and bad input stopped with file:line."""
import json
from collections import Counter

import pytest

from distill.config import TaskConfig, load_recipe
from distill.data import builtin_task
from distill.data.read import read_rows, validate_rows
from distill.data.splits import prepare_splits
from distill.errors import UsageError


def test_default_task_is_deterministic_varied_and_balanced():
    a, b = builtin_task.make_examples(), builtin_task.make_examples()
    assert a == b
    assert len(a) >= 1000 and len({r["label"] for r in a}) >= 6
    assert len({r["text"] for r in a}) == len(a)
    first_words = {r["text"].split()[0].lower() for r in a}
    assert len(first_words) > 30  # real variety of wording


def test_splits_are_stratified_disjoint_and_stable(tmp_path):
    task = TaskConfig()
    s1 = prepare_splits(task, tmp_path / "a")
    s2 = prepare_splits(task, tmp_path / "b")
    assert s1.fingerprint == s2.fingerprint and s1.train == s2.train
    texts = [set(e["text"] for e in s1.get(n)) for n in ("train", "validation", "holdout")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    counts = {}
    for e in s1.holdout:
        counts[e["label"]] = counts.get(e["label"], 0) + 1
    assert len(set(counts.values())) == 1  # every class has the same share of the holdout
    meta = json.loads((tmp_path / "a" / "data" / "split.json").read_text())
    assert meta["fingerprint"] == s1.fingerprint


def test_explicit_holdout_file_is_kept_apart(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    test_rows = [{"text": f"x{i}", "label": "a"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    task = TaskConfig(data=str(tmp_path / "d.jsonl"), holdout_data=str(tmp_path / "t.jsonl"))
    assert prepare_splits(task, tmp_path).holdout == []  # not opened unless evaluation asks
    s = prepare_splits(task, tmp_path, with_holdout=True)
    assert [e["text"] for e in s.holdout] == [f"x{i}" for i in range(5)]
    assert len(s.train) + len(s.validation) == 40


@pytest.mark.parametrize("content, expected", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label"\n', ":2: not valid JSON"),
    ('{"text": "a", "label": "x"}\n{"label": "x"}\n', ":2: missing field 'text'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "nope"}\n', ":2: label 'nope' is not in the label set"),
    ('{"text": "", "label": "x"}\n', ":1: field 'text' is empty"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ('', "the file is empty"),
])
def test_bad_rows_name_the_line(tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UsageError, match=expected.replace("(", r"\(")):
        validate_rows(read_rows(p), TaskConfig(data=str(p)), ["x"], p)


def test_non_utf8_and_csv(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok", "label": "x"}\n{"text": "\xff\xfe", "label": "x"}\n')
    with pytest.raises(UsageError, match=":2: not UTF-8"):
        read_rows(p)
    c = tmp_path / "d.csv"
    c.write_text("text,label\nhello,x\nworld,y,extra\n")
    with pytest.raises(UsageError, match=":3: more fields than the header"):
        read_rows(c)


def test_unknown_recipe_key_suggests_the_right_one(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("task:\n  type: classification\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(UsageError, match=r"r.yaml: unknown key 'train.learning_rate'"):
        load_recipe(r)
    r.write_text("train:\n  epocs: 2\n")
    with pytest.raises(UsageError, match="did you mean 'train.epochs'"):
        load_recipe(r)
    r.write_text("train:\n  lr: fast\n")
    with pytest.raises(UsageError, match="train.lr: expected a number"):
        load_recipe(r)


def test_extends_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {lr: 0.1, epochs: 3}\n")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\ntrain: {epochs: 1}\n")
    r = load_recipe(tmp_path / "r.yaml")
    assert r.train.lr == 0.1 and r.train.epochs == 1


def test_subsets_are_stratified_exact_and_stable():
    """A subset of a file sorted by label (Banking77 is) keeps every class's share, has exactly n
    examples, and is the same every time."""
    from distill.data.sampling import subset_indices

    rows = [{"text": f"{c}{i}", "label": c} for c in "abcdefg" for i in range(10 + 3 * "abcdefg".index(c))]
    for n in (7, 20, 33, len(rows) - 1):
        idx = subset_indices(rows, n, seed=0)
        assert len(idx) == n == len(set(idx)) and idx == sorted(idx) == subset_indices(rows, n, seed=0)
        got = Counter(rows[i]["label"] for i in idx)
        for c in "abcdefg":
            share = n * sum(r["label"] == c for r in rows) / len(rows)
            assert abs(got[c] - share) < 1, (n, c, got[c], share)
    assert subset_indices(rows, 7, seed=0) != subset_indices(rows, 7, seed=1)
    assert subset_indices(rows, None, seed=0) == list(range(len(rows)))
    assert subset_indices(rows, 5, seed=0, key=None) == [0, 1, 2, 3, 4]  # generation: the first n
