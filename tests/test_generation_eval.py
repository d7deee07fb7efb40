"""`distill eval` on a generation task, through the real CLI: every holdout prompt decoded greedily, the report
computed from exactly the outputs it lists, a second model's report beside the first (never over it), a
model's f16 GGUF giving the same outputs as the model, and the recipe keys checked."""
import hashlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distill.cli import cli
from distill.evaluate.generation_metrics import json_metrics

INTENTS = {"PlayMusic": ("play {} on spotify", "artist"), "GetWeather": ("weather in {} tomorrow", "city")}
VALUES = ["paris", "lima", "oslo", "rome", "kyiv", "bern", "doha", "riga", "baku", "suva"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("geneval")
    rows = []
    for intent, (text, slot) in INTENTS.items():
        for v in VALUES:
            rows.append({"prompt": text.format(v),
                         "response": json.dumps({"intent": intent, "slots": {slot: v}})})
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = {"name": "geneval", "workdir": str(tmp / "w"), "teacher": tiny_model,
         "task": {"type": "generation", "data": str(tmp / "d.jsonl"), "output": "json", "class_field": "intent",
                  "max_length": 64, "split": {"validation": 0.2, "holdout": 0.3}},
         "generate": {"max_new_tokens": 8}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(r))
    return tmp / "r.yaml"


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_report_is_computed_from_the_outputs_it_lists(recipe, tiny_model):
    out = run("eval", tiny_model, "--recipe", recipe, "--name", "a")
    report_dir = Path(yaml.safe_load(recipe.read_text())["workdir"]) / "eval" / "a"
    report = json.loads((report_dir / "report.json").read_text())
    rows = [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines()]
    assert report["task"] == "generation" and report["n"] == len(rows) == 6  # 30% of 20
    assert all(set(r) == {"id", "prompt", "reference", "output"} for r in rows)
    again = json_metrics([r["reference"] for r in rows], [r["output"] for r in rows], "intent")
    for key in ("valid_json", "exact_match", "field_micro", "fields", "class"):
        assert report[key] == again[key]
    assert report["new_tokens"] > 0 and report["new_tokens_per_s"] > 0
    assert (report_dir / "confusion.png").is_file() and "exact match" in out


def test_a_second_report_never_replaces_the_first(recipe, tiny_model):
    first = Path(yaml.safe_load(recipe.read_text())["workdir"]) / "eval" / "a" / "report.json"
    if not first.is_file():
        run("eval", tiny_model, "--recipe", recipe, "--name", "a")
    before = hashlib.sha256(first.read_bytes()).hexdigest()
    run("eval", tiny_model, "--recipe", recipe, "--name", "b", "--limit", "2")
    assert hashlib.sha256(first.read_bytes()).hexdigest() == before
    assert (first.parent.parent / "b-limit2" / "report.json").is_file()


def test_gguf_outputs_equal_the_models(recipe, tiny_model, tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = tmp_path / "m.gguf"
    run("export", tiny_model, "--out", gguf, "--quant", "f16", "--no-verify")
    outs = {}
    for name, model in (("hf", tiny_model), ("gguf", gguf)):
        run("eval", model, "--recipe", recipe, "--name", name, "--limit", "4")
        d = Path(yaml.safe_load(recipe.read_text())["workdir"]) / "eval" / f"{name}-limit4"
        outs[name] = [json.loads(line)["output"] for line in (d / "predictions.jsonl").read_text().splitlines()]
    assert outs["hf"] == outs["gguf"]


@pytest.mark.parametrize("task, expected", [
    ({"type": "classification", "output": "json"}, "need task.type generation"),
    ({"class_field": "intent", "output": "text"}, "set task.output: json"),
    ({"output": "yaml"}, "task.output"),
])
def test_output_keys_are_checked(recipe, tiny_model, task, expected):
    r = yaml.safe_load(recipe.read_text())
    r["task"].update(task)
    bad = recipe.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump(r))
    res = CliRunner().invoke(cli, ["eval", tiny_model, "--recipe", str(bad)])
    assert res.exit_code == 2 and expected in res.output, res.output


def test_bench_on_a_generation_task_scores_outputs_and_agreement(recipe, tiny_model, tmp_path):
    """The teacher against itself and against its f16 GGUF: agreement 1 with itself, exact match and tokens/s
    reported for both, and the table written."""
    pytest.importorskip("llama_cpp")
    gguf = tmp_path / "m.gguf"
    run("export", tiny_model, "--out", gguf, "--quant", "f16", "--no-verify")
    out = tmp_path / "bench"
    run("bench", recipe, "--teacher", tiny_model, "--student", tiny_model, "--student", gguf, "--limit", "4",
        "--latency-examples", "2", "--out", out)
    report = json.loads((out / "bench.json").read_text())
    teacher, same, quantized = report["models"]
    assert report["task"] == "generation" and report["n"] == 4
    assert same["agreement"] == 1.0 and same["outputs"] == teacher["outputs"]
    assert quantized["runtime"] == "llama.cpp" and quantized["outputs"] == teacher["outputs"]  # f16: same greedy
    assert all(r["new_tokens_per_s"] > 0 and "exact_match" in r and "field_f1" in r for r in report["models"])
    assert "exact match" in (out / "bench.md").read_text() and (out / "bench.png").is_file()
