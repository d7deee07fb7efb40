"""Generation metrics against counts made by hand on small cases: invalid JSON, a missing field, a repeated
slot, an extra field; the class field's figures against scikit-learn; chrF against sacrebleu."""
import json

import pytest
from sklearn.metrics import accuracy_score, f1_score

from distill.evaluate.generation_metrics import (
    INVALID,
    exact_match,
    field_pairs,
    json_metrics,
    parse_json_object,
    text_metrics,
)


def js(intent, **slots):
    return json.dumps({"intent": intent, "slots": slots})


REFS = [
    js("PlayMusic", artist="westbam", service="google music"),
    js("GetWeather", city="paris"),
    json.dumps({"intent": "AddToPlaylist", "slots": {"entity_name": ["a", "b"]}}),  # a slot repeated
    js("RateBook", best_rating="6"),
]
OUTS = [
    js("PlayMusic", artist="westbam"),  # a missing field: 2 of 3 pairs
    '{"intent": "GetWeather", "slots": {"city": "paris"',  # invalid JSON: no pair
    json.dumps({"intent": "AddToPlaylist", "slots": {"entity_name": ["a"], "playlist": "x"}}),  # one of two + extra
    "  " + js("RateBook", best_rating="6") + "\n",  # exact (whitespace around it)
]


def test_field_pairs_flatten_nested_objects_and_lists():
    pairs = field_pairs(json.loads(REFS[2]))
    assert pairs == {("intent", "AddToPlaylist"): 1, ("slots.entity_name", "a"): 1, ("slots.entity_name", "b"): 1}
    assert field_pairs(None) == {}


def test_parse_accepts_objects_only():
    assert parse_json_object(' {"a": 1} ') == {"a": 1}
    assert parse_json_object("```json\n{\"a\": 1}\n```") == {"a": 1}
    for bad in ("[1, 2]", "3", "", "{", "null", "[" * 100000):
        assert parse_json_object(bad) is None


def test_json_metrics_match_a_count_by_hand():
    m = json_metrics(REFS, OUTS, class_field="intent")
    assert m["valid_json"] == 3 / 4
    assert m["exact_match"] == 1 / 4
    # reference pairs: 3 + 2 + 3 + 2 = 10; predicted: 2 + 0 + 3 + 2 = 7; correct: 2 + 0 + 2 + 2 = 6
    micro = m["field_micro"]
    assert micro["precision"] == pytest.approx(6 / 7) and micro["recall"] == pytest.approx(6 / 10)
    assert micro["f1"] == pytest.approx(2 * (6 / 7) * (6 / 10) / (6 / 7 + 6 / 10))
    # without the class field: ref 6, predicted 4 (westbam, a, x, 6), correct 3
    slots = m["field_micro_without_class"]
    assert slots["precision"] == pytest.approx(3 / 4) and slots["recall"] == pytest.approx(3 / 6)
    assert m["fields"]["slots.playlist"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["fields"]["slots.entity_name"]["recall"] == pytest.approx(1 / 2)
    assert m["fields"]["slots.entity_name"]["precision"] == pytest.approx(1.0)


def test_class_field_figures_equal_scikit_learn():
    m = json_metrics(REFS, OUTS, class_field="intent")["class"]
    gold = ["PlayMusic", "GetWeather", "AddToPlaylist", "RateBook"]
    pred = ["PlayMusic", INVALID, "AddToPlaylist", "RateBook"]
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=sorted(set(gold)), average="macro"))
    assert m["per_class"]["GetWeather"]["recall"] == 0.0
    assert sum(map(sum, m["confusion"])) == 4


def test_exact_match_as_text_and_as_json():
    assert exact_match(["a b", "c"], [" a b ", "d"]) == 0.5
    assert exact_match(['{"a": 1, "b": 2}'], ['{"b":2,"a":1}'], as_json=True) == 1.0
    assert exact_match(['{"a": 1}'], ["not json"], as_json=True) == 0.0


def test_chrf_is_sacrebleus():
    from sacrebleu.metrics import CHRF

    refs, outs = ["the cat sat on the mat", "hello there"], ["the cat sat on a mat", "hello"]
    m = text_metrics(refs, outs)
    assert m["chrf"] == pytest.approx(CHRF().corpus_score(outs, [refs]).score)
    assert m["exact_match"] == 0.0
