"""The three-teacher Banking77 study's table (scripts/banking77-teachers.sh): every model's test macro-F1
and its validation macro-F1 at the saved epoch, each student kind's mean and spread over the seeds, and
the margins the issue asks for. Writes W/eval-teachers/summary.json; prints markdown.

    python scripts/teachers_summary.py runs/banking77 "0 1 2"

The decision rule, fixed before any test figure was read (docs/results.md, "Three teachers"): the best
student kind is the one with the higher mean validation macro-F1 (the ensemble's student over the seeds,
or the single-teacher student at seed 0); its margin over the control is the difference of their test
means, and it counts only if it is larger than the spread (the larger of the two kinds' sample standard
deviations over the seeds).
"""
import json
import statistics
import sys
from pathlib import Path


def read(w: Path, name: str, model: str | None) -> dict | None:
    rep = w / "eval-teachers" / name / "report.json"
    if not rep.is_file():
        return None
    r = json.loads(rep.read_text())
    row = {"name": name, "test_macro_f1": r["macro_f1"], "test_accuracy": r["accuracy"], "n": r["n"],
           "parameters": r["parameters"]}
    tj = w / model / "training.json" if model else None
    if tj and tj.is_file():
        row["val_macro_f1"] = json.loads(tj.read_text())["best"].get("val_f1")
    return row


def ensemble_from_predictions(w: Path) -> dict | None:
    """The three teachers' ensemble on the test split from their eval predictions: per text the mean of their
    label probabilities (as written, 4 decimals), its argmax scored with scikit-learn against the labels."""
    from sklearn.metrics import accuracy_score, f1_score

    files = [w / "eval-teachers" / t / "predictions.jsonl" for t in ("teacher-0", "teacher-1", "teacher-2")]
    if not all(f.is_file() for f in files):
        return None
    rows = [[json.loads(x) for x in f.read_text().splitlines()] for f in files]
    labels = list(json.loads((w / "eval-teachers" / "teacher-0" / "report.json").read_text())["per_class"])
    gold, pred = [], []
    for per in zip(*rows):
        assert len({r["id"] for r in per}) == 1 and len({r["label"] for r in per}) == 1, "predictions out of order"
        mean = [sum(p) / 3 for p in zip(*(r["probs"] for r in per))]
        gold.append(per[0]["label"])
        pred.append(labels[max(range(len(mean)), key=mean.__getitem__)])
    params = sum(json.loads((w / "eval-teachers" / t / "report.json").read_text())["parameters"]
                 for t in ("teacher-0", "teacher-1", "teacher-2"))
    return {"name": "ensemble (from the teachers' predictions)", "n": len(gold), "parameters": params,
            "test_macro_f1": f1_score(gold, pred, labels=labels, average="macro", zero_division=0),
            "test_accuracy": accuracy_score(gold, pred)}


def kind(rows: list[dict]) -> dict:
    test = [r["test_macro_f1"] for r in rows]
    val = [r["val_macro_f1"] for r in rows if r.get("val_macro_f1") is not None]
    sd = statistics.stdev(test) if len(test) > 1 else None
    return {"seeds": len(rows), "test_mean": statistics.mean(test), "test_sd": sd, "test_min": min(test),
            "test_max": max(test), "val_mean": statistics.mean(val) if val else None}


def main(w: Path, seeds: list[str]) -> dict:
    single = {n: read(w, n, m) for n, m in [("teacher-0", "teacher"), ("teacher-1", "teacher-1"),
                                            ("teacher-2", "teacher-2"), ("ensemble", None),
                                            ("student-s0", "student-s0"),
                                            ("student-written-s0", "student-written-s0")]}
    ens = [read(w, f"student-ensemble-s{s}", f"student-ensemble-s{s}") for s in seeds]
    ctl = [read(w, f"control-s{s}", f"control-s{s}") for s in seeds]
    single["ensemble-from-predictions"] = ensemble_from_predictions(w)
    out = {"models": {k: v for k, v in single.items() if v}, "ensemble_students": [r for r in ens if r],
           "controls": [r for r in ctl if r]}
    if all(ens) and all(ctl):
        out["ensemble_student"], out["control"] = kind(ens), kind(ctl)
        kinds = {"ensemble student": out["ensemble_student"]}
        if single["student-s0"]:
            kinds["single-teacher student"] = kind([single["student-s0"]])
        best = max(kinds, key=lambda k: kinds[k]["val_mean"] or -1)
        spread = max(s for s in (kinds[best]["test_sd"], out["control"]["test_sd"]) if s is not None) \
            if len(seeds) > 1 else None
        margin = kinds[best]["test_mean"] - out["control"]["test_mean"]
        out["best_student"] = {"kind": best, "margin_over_control": margin, "spread": spread}
        teachers = [single[t]["test_macro_f1"] for t in ("teacher-0", "teacher-1", "teacher-2") if single[t]]
        if teachers:
            out["best_teacher_test_macro_f1"] = max(teachers)
            out["ensemble_student_minus_best_teacher"] = out["ensemble_student"]["test_mean"] - max(teachers)
    (w / "eval-teachers" / "summary.json").write_text(json.dumps(out, indent=1))
    return out


def markdown(out: dict) -> str:
    lines = ["| model | parameters | validation macro-F1 | test macro-F1 |", "| --- | ---: | ---: | ---: |"]
    for r in [*out["models"].values(), *out["ensemble_students"], *out["controls"]]:
        val = f"{r['val_macro_f1']:.4f}" if r.get("val_macro_f1") is not None else "-"
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {val} | {r['test_macro_f1']:.4f} |")
    for k in ("ensemble_student", "control"):
        if k in out:
            s = out[k]
            sd = f" ± {s['test_sd']:.4f} (sd)" if s["test_sd"] is not None else ""
            lines.append(f"\n{k}: test macro-F1 mean {s['test_mean']:.4f}{sd}, range {s['test_min']:.4f}-"
                         f"{s['test_max']:.4f} over {s['seeds']} seeds; validation mean {s['val_mean']:.4f}")
    if "best_student" in out:
        b = out["best_student"]
        spread = f", spread {100 * b['spread']:.2f}" if b["spread"] is not None else ""
        lines.append(f"\nbest student by validation: {b['kind']}; margin over the control "
                     f"{100 * b['margin_over_control']:+.2f} points{spread}")
    if "best_teacher_test_macro_f1" in out:
        lines.append(f"ensemble student minus the best single teacher: "
                     f"{100 * out['ensemble_student_minus_best_teacher']:+.2f} points")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(main(Path(sys.argv[1]), sys.argv[2].split() if len(sys.argv) > 2 else ["0", "1", "2"])))
