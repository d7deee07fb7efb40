"""The bad-input table: each case must stop with exit status 2 (usage) or 1 (failure), a message naming
the file/line/key and what was expected, and no traceback. Run in-process with click's runner."""
import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from distill.cli import cli

from conftest import write_class_data, write_recipe


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    """A working recipe with a finished cache, to be broken one way per case."""
    tmp = tmp_path_factory.mktemp("bad")
    data = write_class_data(tmp / "good.jsonl")
    recipe = write_recipe(tmp / "good.yaml", data, tmp / "w", tiny_model, student={"num_layers": 1})
    res = CliRunner().invoke(cli, ["generate", str(recipe), "--backend", "transformers"])
    assert res.exit_code == 0, res.output
    return {"tmp": tmp, "data": data, "recipe": recipe, "model": tiny_model}


def recipe_with(env, name, *, task=None, train=None, top=None, data_text=None, data_suffix=".jsonl"):
    """A copy of the good recipe with some keys replaced (and optionally new data contents)."""
    r = yaml.safe_load(env["recipe"].read_text())
    r["workdir"] = str(env["tmp"] / f"w-{name}")
    if data_text is not None:
        p = env["tmp"] / f"{name}{data_suffix}"
        p.write_bytes(data_text if isinstance(data_text, bytes) else data_text.encode())
        r["task"]["data"] = str(p)
    r["task"].update(task or {})
    r["train"].update(train or {})
    r.update(top or {})
    out = env["tmp"] / f"{name}.yaml"
    out.write_text(yaml.safe_dump(r))
    return str(out)


GOOD = '{"text": "card charged twice", "label": "billing"}\n'


def cases(env):
    t, good, model = env["tmp"], str(env["recipe"]), env["model"]
    gen = lambda r, *a: ["generate", r, "--backend", "transformers", *a]  # noqa: E731
    bert = t / "bert"
    if not bert.exists():
        from transformers import BertConfig

        bert.mkdir()
        (bert / "config.json").write_text(json.dumps({**BertConfig(num_hidden_layers=1).to_dict(), "architectures": ["BertModel"]}))
    (t / "not_yaml.yaml").write_text("train:\n  lr: [1, 2\n")
    (t / "no_source.yaml").write_text("name: x\nbackend: transformers\n")
    (t / "bad_backend.yaml").write_text(f"name: x\nsource: {model}\nbackend: tensorrt\n")
    (t / "bad_gpu.yaml").write_text(f"name: x\nsource: {model}\ngpu_memory_utilization: 1.5\n")
    empty_dir = t / "empty_model_dir"
    empty_dir.mkdir(exist_ok=True)
    labels = {name: t / f"labels-{name}" for name in ("dup.json", "dup.txt", "bad.json", "blank.json")}
    for (name, path), text in zip(labels.items(), ('["billing", "login", "billing"]', "billing\nlogin\nbilling\n",
                                                   '["billing", "login"', "")):
        path.write_text(text)
    a_file = t / "a_file.txt"  # an --out below a file: a path that cannot be written, even as root
    a_file.write_text("x")
    return [
        # --- data files (generate) ---
        ("malformed JSON line", gen(recipe_with(env, "m1", data_text=GOOD + '{"text": "x", "label"\n')), 2, "m1.jsonl:2: not valid JSON"),
        ("non-UTF-8 bytes", gen(recipe_with(env, "m2", data_text=GOOD.encode() + b'{"text": "\xff", "label": "billing"}\n')), 2, "m2.jsonl:2: not UTF-8"),
        ("empty file", gen(recipe_with(env, "m3", data_text="")), 2, "m3.jsonl: the file is empty"),
        ("blank lines only", gen(recipe_with(env, "m4", data_text="\n\n")), 2, "m4.jsonl: no examples"),
        ("missing text field", gen(recipe_with(env, "m5", data_text=GOOD + '{"label": "billing"}\n')), 2, "m5.jsonl:2: missing field 'text'"),
        ("missing label field", gen(recipe_with(env, "m6", data_text=GOOD + '{"text": "hi"}\n')), 2, "m6.jsonl:2: missing field 'label'"),
        ("empty text", gen(recipe_with(env, "m7", data_text=GOOD + '{"text": "  ", "label": "billing"}\n')), 2, "m7.jsonl:2: field 'text' is empty"),
        ("label outside the label set", gen(recipe_with(env, "m8", data_text=GOOD + '{"text": "hi", "label": "weather"}\n')), 2, "m8.jsonl:2: label 'weather' is not in the label set"),
        ("a JSON array instead of an object", gen(recipe_with(env, "m9", data_text=GOOD + '["hi", "billing"]\n')), 2, "m9.jsonl:2: expected a JSON object"),
        ("non-text field value", gen(recipe_with(env, "m10", data_text=GOOD + '{"text": {"a": 1}, "label": "billing"}\n')), 2, "m10.jsonl:2: field 'text' must be text"),
        ("CSV row with an extra column", gen(recipe_with(env, "m11", data_text="text,label\nhi,billing\nyo,billing,extra\n", data_suffix=".csv")), 2, "m11.csv:3: more fields than the header"),
        ("CSV missing a column", gen(recipe_with(env, "m12", data_text="text\nhi\n", data_suffix=".csv")), 2, "m12.csv:2: missing field 'label'"),
        ("nonexistent data path", gen(recipe_with(env, "m13", task={"data": str(t / "nope.jsonl")})), 2, "nope.jsonl: no such file"),
        ("unknown built-in dataset", gen(recipe_with(env, "m14", task={"data": "builtin:imdb"})), 2, "builtin:imdb: unknown built-in dataset"),
        ("unknown task type", gen(recipe_with(env, "m15", task={"type": "regression"})), 2, "task.type: expected one of classification, generation, got 'regression'"),
        # --- recipes and teacher specs ---
        ("nonexistent recipe", gen(str(t / "missing.yaml")), 2, "missing.yaml: no such file"),
        ("invalid YAML", gen(str(t / "not_yaml.yaml")), 2, "not_yaml.yaml:"),
        ("unknown top-level key", gen(recipe_with(env, "r1", top={"trian": {}})), 2, "unknown key 'trian' (did you mean 'train'?)"),
        ("mistyped nested key", gen(recipe_with(env, "r2", train={"learnig_rate": 1})), 2, "unknown key 'train.learnig_rate'"),
        ("wrong value type", gen(recipe_with(env, "r3", train={"epochs": "many"})), 2, "train.epochs: expected a number"),
        ("teacher spec without a source", gen(good, "--teacher", str(t / "no_source.yaml")), 2, "no_source.yaml: source: expected"),
        ("unknown backend in a teacher spec", ["generate", good, "--teacher", str(t / "bad_backend.yaml")], 2, "backend: expected one of"),
        ("teacher directory without config.json", gen(good, "--teacher", str(empty_dir)), 2, "not a model directory (no config.json)"),
        ("nonexistent teacher directory", gen(good, "--teacher", str(t / "no_model_here")), 2, "no_model_here: no such model directory"),
        ("cache of another teacher", gen(good, "--teacher", str(bert)), 2, ""),
        ("duplicate label in a labels file", gen(recipe_with(env, "l1", task={"labels": None, "labels_file": str(labels["dup.json"])})), 2, "labels-dup.json: label 'billing' appears more than once"),
        ("duplicate label in a text labels file", gen(recipe_with(env, "l2", task={"labels": None, "labels_file": str(labels["dup.txt"])})), 2, "labels-dup.txt: label 'billing' appears more than once"),
        ("malformed labels.json", gen(recipe_with(env, "l3", task={"labels": None, "labels_file": str(labels["bad.json"])})), 2, "labels-bad.json:1: not valid JSON"),
        ("blank labels.json", gen(recipe_with(env, "l4", task={"labels": None, "labels_file": str(labels["blank.json"])})), 2, "labels-blank.json: the labels file is empty"),
        ("duplicate label in task.labels", gen(good, "--set", "task.labels=[billing, login, billing]"), 2, "task.labels: expected distinct values"),
        ("extends cycle", gen(recipe_with(env, "x1", top={"extends": "x1.yaml"})), 2, "extends: a cycle"),
        ("max_length below 16", gen(recipe_with(env, "r4", task={"max_length": 8})), 2, "r4.yaml: task.max_length: expected at least 16, got 8"),
        ("negative split fraction", gen(recipe_with(env, "r5", task={"split": {"holdout": -0.1}})), 2, "task.split.holdout: expected a number in [0, 1)"),
        ("split fractions that leave no training data", gen(recipe_with(env, "r6", task={"split": {"validation": 0.6, "holdout": 0.4}})), 2, "validation + holdout must be below 1"),
        ("generate k of 0", gen(good, "--k", "0"), 2, "--k"),
        ("generate.top_p of 0 through --set", gen(good, "--set", "generate.top_p=0"), 2, "--set generate.top_p=0: generate.top_p: expected a number in (0, 1]"),
        ("mistyped key through --set", gen(good, "--set", "generate.kk=3"), 2, "unknown key 'generate.kk' (did you mean 'generate.k'?)"),
        ("wrong type through --set", gen(good, "--set", "generate.batch_size=many"), 2, "generate.batch_size: expected an integer, got 'many'"),
        ("--set without a value", gen(good, "--set", "generate.k"), 2, "expected KEY=VALUE"),
        ("teacher spec with gpu_memory_utilization above 1", gen(good, "--teacher", str(t / "bad_gpu.yaml")), 2, "bad_gpu.yaml: gpu_memory_utilization: expected a number in (0, 1]"),
        # --- train ---
        ("negative learning rate", ["train", good, "--lr", "-1"], 2, "--lr: train.lr: expected a number > 0, got -1.0"),
        ("negative seed", ["train", good, "--seed", "-1"], 2, "train.seed: expected at least 0"),
        ("zero student layers", ["train", good, "--num-layers", "0"], 2, "train.student.num_layers: expected at least 1, got 0"),
        ("negative train_examples", ["train", good, "--train-examples", "-3"], 2, "train.train_examples: expected at least 1, got -3"),
        ("negative max_grad_norm", ["train", recipe_with(env, "t6", train={"max_grad_norm": -1})], 2, "t6.yaml: train.max_grad_norm: expected a number > 0"),
        ("LoRA rank 0", ["train", good, "--set", "train.lora.r=0"], 2, "train.lora.r: expected at least 1, got 0"),
        ("LoRA dropout of 1", ["train", good, "--set", "train.lora.dropout=1"], 2, "train.lora.dropout: expected a number in [0, 1)"),
        ("repeated student layer", ["train", good, "--set", "train.student.from_teacher_layers=[0, 0]"], 2, "from_teacher_layers: expected distinct values"),
        ("val_f1 for a generation task", ["train", recipe_with(env, "t7", task={"type": "generation"}, train={"early_stopping_metric": "val_f1"})], 2, "val_f1 exists for classification only"),
        ("stop-after-steps of 0", ["train", good, "--stop-after-steps", "0"], 2, "--stop-after-steps"),
        ("alpha outside [0, 1]", ["train", good, "--alpha", "1.5"], 2, "train.alpha: expected a number in [0, 1]"),
        ("no cache for distillation", ["train", recipe_with(env, "t1", top={"workdir": str(t / "fresh")})], 2, "not a teacher cache (no manifest.json)"),
        ("cache made for other data", ["train", recipe_with(env, "t2", data_text=GOOD * 1 + '{"text": "other", "label": "login"}\n' + '{"text": "more", "label": "delivery"}\n' * 1 + "".join(json.dumps({"text": f"x{i}", "label": "login"}) + "\n" for i in range(9))), "--cache", str(t / "w" / "cache")], 2, "made for other data"),
        ("LoRA target that does not exist", ["train", recipe_with(env, "t3", train={"alpha": 0.0, "lora": {"target_modules": ["c_attn"]}})], 2, "train.lora.target_modules: ['c_attn'] not found"),
        ("more student layers than the teacher has", ["train", good, "--num-layers", "9"], 2, "train.student.num_layers: expected 1..2"),
        ("student layer index out of range", ["train", recipe_with(env, "t4", train={"student": {"from_teacher_layers": [0, 5]}})], 2, "out of range; the teacher has 2 layers"),
        ("student that is not a causal LM", ["train", recipe_with(env, "t5", train={"alpha": 0.0, "student": {"model": str(bert)}})], 2, "not a causal language model"),
        # --- eval ---
        ("eval of a nonexistent model", ["eval", str(t / "nothing"), "--recipe", good], 2, "nothing: no such model directory"),
        ("eval file with an unknown label", ["eval", model, "--recipe", good, "--data", str(recipe_with(env, "e1", data_text=GOOD + '{"text": "a", "label": "sport"}\n').replace(".yaml", ".jsonl"))], 2, "e1.jsonl:2: label 'sport'"),
        ("eval of a missing GGUF file", ["eval", str(t / "model.gguf"), "--recipe", good], 2, "model.gguf"),
        ("eval of a generation recipe", ["eval", model, "--recipe", recipe_with(env, "e2", task={"type": "generation"})], 2, "distill eval scores classification tasks"),
        ("eval with an unknown split", ["eval", model, "--recipe", good, "--split", "test"], 2, "'test' is not one of"),
        ("eval batch size 0", ["eval", model, "--recipe", good, "--batch-size", "0"], 2, "--batch-size"),
        ("eval limit -1", ["eval", model, "--recipe", good, "--limit", "-1"], 2, "--limit"),
        ("eval negative shots", ["eval", model, "--recipe", good, "--shots", "-1"], 2, "--shots"),
        ("eval --out below a file", ["eval", model, "--recipe", good, "--limit", "3", "--out", str(a_file / "report")], 2, "a_file.txt"),
        # --- export and bench ---
        ("export --set without --recipe", ["export", model, "--out", str(t / "x.gguf"), "--set", "task.max_length=64"], 2, "add --recipe"),
        ("bench latency examples 0", ["bench", "--recipe", good, "--teacher", model, "--student", model, "--latency-examples", "0"], 2, "--latency-examples"),
        ("serve-teacher port out of range", ["serve-teacher", model, "--port", "70000"], 2, "--port"),
        ("export of an unsupported architecture", ["export", str(bert), "--out", str(t / "b.gguf")], 2, "supported"),
        ("export of a nonexistent directory", ["export", str(t / "nope_dir"), "--out", str(t / "x.gguf")], 2, "nope_dir"),
        ("export with an unknown quant type", ["export", model, "--quant", "q3_k", "--out", str(t / "x.gguf")], 2, "'q3_k' is not one of"),
        ("bench of a nonexistent student", ["bench", "--recipe", good, "--teacher", model, "--student", str(t / "ghost"), "--limit", "2", "--latency-examples", "1"], 2, "ghost"),
    ]


def test_bad_input_table(env):
    table = cases(env)
    assert len(table) >= 30
    failures = []
    for name, args, code, expected in table:
        res = CliRunner().invoke(cli, args)
        text = res.output + (res.stderr if res.stderr_bytes is not None else "")
        problems = []
        if res.exit_code != code:
            problems.append(f"exit {res.exit_code}, expected {code}")
        if expected and expected not in text:
            problems.append(f"message lacks {expected!r}")
        if "Traceback" in text or not isinstance(res.exception, (SystemExit, type(None))):
            problems.append(f"raised {type(res.exception).__name__}: {res.exception}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    output: {text.strip()[-300:]}")
    report = env["tmp"] / "bad_input_report.json"
    report.write_text(json.dumps({"cases": len(table), "failures": failures}, indent=1))
    assert not failures, f"{len(failures)} of {len(table)} cases failed:\n" + "\n".join(failures)


def test_duplicates_are_dropped_with_a_warning(env, caplog):
    r = recipe_with(env, "dup", data_text=GOOD * 2 + "".join(
        json.dumps({"text": f"t{i}", "label": ["billing", "login", "delivery"][i % 3]}) + "\n" for i in range(20)))
    from distill.config import load_recipe
    from distill.data import prepare_splits

    rec = load_recipe(r)
    with caplog.at_level("WARNING"):
        s = prepare_splits(rec.task, rec.workdir)
    assert "dropped 1 duplicate" in caplog.text
    assert len(s.train) + len(s.validation) + len(s.holdout) == 21


def test_failed_generate_keeps_the_existing_cache(env):
    """A refused run (another teacher) leaves the finished cache byte for byte as it was."""
    cache = env["tmp"] / "w" / "cache"
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    res = CliRunner().invoke(cli, ["generate", str(env["recipe"]), "--teacher", str(env["tmp"] / "bert"), "--backend", "transformers"])
    assert res.exit_code == 2
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before


def test_doctor_passes_a_good_setup_and_catches_a_corrupt_cache(env, tmp_path):
    good = CliRunner().invoke(cli, ["doctor", "--recipe", str(env["recipe"]), "--student", env["model"], "--json"])
    assert good.exit_code == 0, good.output
    checks = {c["check"]: c for c in json.loads(good.output[good.output.index("[\n"):])}
    assert checks["cache"]["status"] == "ok" and checks["student"]["status"] == "ok"
    assert "examples, about" in checks["estimate"]["detail"]
    broken = tmp_path / "cache"
    shutil.copytree(env["tmp"] / "w" / "cache", broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    bad = CliRunner().invoke(cli, ["doctor", "--cache", str(broken), "--no-estimate"])
    assert bad.exit_code == 1 and "corrupt" in bad.output and shard.name in bad.output
