"""Scores for generated outputs against their references: exact match, and for structured (JSON) outputs
the valid-JSON rate, field-level precision/recall/F1 and the named class field's classification report;
for free text chrF (sacrebleu).

A JSON output is compared as a multiset of (field, value) pairs: `{"intent": "PlayMusic", "slots":
{"artist": "westbam"}}` holds ("intent", "PlayMusic") and ("slots.artist", "westbam"); a list value adds
one pair per element, so a slot repeated with two values counts twice. An output that is not a JSON object
holds no pair: it scores zero on its row and never stops the run.
"""
from __future__ import annotations

import json
from collections import Counter

from distill.evaluate.metrics import classification_metrics

INVALID = "<invalid>"  # the predicted class of an output with no readable class field


def parse_json_object(text: str) -> dict | None:
    """The JSON object `text` holds (surrounding whitespace and a ```json fence allowed), else None."""
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def field_pairs(obj: dict | None, prefix: str = "") -> Counter:
    """The (field path, value) multiset of a JSON object; values compared as canonical JSON text."""
    out: Counter = Counter()
    for key, value in (obj or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += field_pairs(value, path + ".")
        elif isinstance(value, list):
            for v in value:
                out[(path, _canonical(v))] += 1
        else:
            out[(path, _canonical(value))] += 1
    return out


def _canonical(value) -> str:
    return value.strip() if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _prf(tp: int, n_pred: int, n_ref: int) -> dict:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_ref if n_ref else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": n_ref}


def exact_match(references: list[str], outputs: list[str], as_json: bool = False) -> float:
    """Share of outputs equal to their reference: as text after stripping, or as parsed JSON objects."""
    if not references:
        return 0.0
    if as_json:
        hits = sum(o is not None and o == r for r, o in zip(map(parse_json_object, references),
                                                              map(parse_json_object, outputs)))
    else:
        hits = sum(r.strip() == o.strip() for r, o in zip(references, outputs))
    return hits / len(references)


def json_metrics(references: list[str], outputs: list[str], class_field: str | None = None) -> dict:
    """Valid-JSON rate, exact match, field-level micro precision/recall/F1 (all fields, and all but the
    class field), per-field figures, and for `class_field` its accuracy, per-class F1 and confusion matrix."""
    refs = [parse_json_object(r) for r in references]
    outs = [parse_json_object(o) for o in outputs]
    per_field: dict[str, list[int]] = {}  # field -> [tp, predicted, reference]
    for ref, out in zip(refs, outs):
        r_pairs, o_pairs = field_pairs(ref), field_pairs(out)
        for (path, _), n in (r_pairs & o_pairs).items():
            per_field.setdefault(path, [0, 0, 0])[0] += n
        for (path, _), n in o_pairs.items():
            per_field.setdefault(path, [0, 0, 0])[1] += n
        for (path, _), n in r_pairs.items():
            per_field.setdefault(path, [0, 0, 0])[2] += n
    n = len(references)
    report = {
        "examples": n,
        "valid_json": sum(o is not None for o in outs) / n if n else 0.0,
        "exact_match": sum(o is not None and o == r for r, o in zip(refs, outs)) / n if n else 0.0,
        "fields": {f: _prf(*c) for f, c in sorted(per_field.items())},
        "field_micro": _prf(*[sum(c[i] for c in per_field.values()) for i in range(3)]),
    }
    if class_field is not None:
        rest = [c for f, c in per_field.items() if f != class_field]
        report["field_micro_without_class"] = _prf(*[sum(c[i] for c in rest) for i in range(3)])
        pred = [_class_of(o, class_field) for o in outs]
        gold = [_class_of(r, class_field) for r in refs]
        classes = sorted(set(gold)) + sorted(set(pred) - set(gold))  # gold classes first, then any others
        index = {c: i for i, c in enumerate(classes)}
        figures = classification_metrics([index[g] for g in gold], [index[p] for p in pred], classes)
        # macro F1 over the classes the references hold: a class only predicted (or INVALID) is an error
        # on the rows where it appears, not a class of its own
        figures["macro_f1"] = sum(figures["per_class"][c]["f1"] for c in set(gold)) / len(set(gold))
        report["class"] = {"field": class_field, **figures}
    return report


def _class_of(obj: dict | None, field: str | None = None) -> str:
    if obj is None or field is None:
        return INVALID
    value = obj
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return INVALID if value is None or isinstance(value, (dict, list)) else str(value)


def text_metrics(references: list[str], outputs: list[str]) -> dict:
    """Exact match and corpus chrF (sacrebleu's, 0-100) for free text."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF().corpus_score(outputs, [references]).score if references else 0.0
    return {"examples": len(references), "exact_match": exact_match(references, outputs), "chrf": chrf}
