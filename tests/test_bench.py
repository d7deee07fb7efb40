"""distill bench on tiny models (HF and GGUF through llama.cpp), and the guard that only evaluation
ever reads the test split."""
import json
import subprocess
import sys

import pytest
from conftest import make_tiny_llama, write_class_data, write_recipe


def distill(*args):
    return subprocess.run([sys.executable, "-m", "distill", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def test_test_split_is_read_only_by_evaluation(tmp_path, tiny_model):
    """generate and train run with the official test file absent; only eval needs it."""
    data = write_class_data(tmp_path / "d.jsonl")
    test_file = tmp_path / "official_test.jsonl"
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", tiny_model, student={"num_layers": 1})
    import yaml

    r = yaml.safe_load(recipe.read_text())
    r["task"]["holdout_data"] = str(test_file)
    recipe.write_text(yaml.safe_dump(r))
    for cmd in (["generate", recipe, "--backend", "transformers"], ["train", recipe, "--epochs", "0.5"]):
        p = distill(*cmd)
        assert p.returncode == 0, p.stderr[-2000:]  # the test file does not exist: nothing read it
    p = distill("eval", tmp_path / "w" / "student", "--recipe", recipe)
    assert p.returncode == 2 and "official_test.jsonl: no such file" in p.stderr
    write_class_data(test_file, copies=1)  # a file of its own: the training file itself is refused
    p = distill("eval", tmp_path / "w" / "student", "--recipe", recipe)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (tmp_path / "w" / "data" / "holdout.jsonl").exists()


def test_bench_hf_and_gguf(tmp_path, tiny_model, smollm2_dir):
    pytest.importorskip("llama_cpp")
    from distill.export.pipeline import export_gguf

    data = write_class_data(tmp_path / "d.jsonl", copies=2)
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", tiny_model)
    student = make_tiny_llama(tmp_path / "student", smollm2_dir, layers=1, seed=3)
    gguf = tmp_path / "student-f16.gguf"
    export_gguf(student, gguf, quant="f16", verify=False)
    p = distill("bench", "--recipe", recipe, "--teacher", tiny_model, "--student", student, "--student", gguf,
                "--tokenizer", student, "--latency-examples", 3, "--batch-size", 4)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "w" / "bench" / "bench.json").read_text())
    rows = {r["name"]: r for r in report["models"]}
    assert (tmp_path / "w" / "bench" / "bench.png").stat().st_size > 1000
    assert "| model |" in (tmp_path / "w" / "bench" / "bench.md").read_text()
    t = rows["model"]
    assert t["agreement"] == 1.0 and t["speedup_1"] == 1.0
    hf, gg = rows["student"], rows["student-f16.gguf"]
    assert gg["runtime"] == "llama.cpp" and hf["runtime"] == "transformers"
    # the same weights through llama.cpp (f16) and transformers (fp32) predict the same labels
    same = sum(a == b for a, b in zip(hf["predictions"], gg["predictions"])) / len(hf["predictions"])
    assert same >= 0.9
    for r in rows.values():
        assert r["latency_p95_ms"] >= r["latency_p50_ms"] > 0 and r["peak_rss_mb"] > 50
