"""The bad-input table: each case runs the real CLI (click's runner, in-process) and must stop with exit
status 2 (usage) or 1 (failure), exactly one error line naming the file/line/key/option and what was
expected, no traceback, and every file that existed before the case byte for byte as it was."""
import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import GEN_ROWS, write_class_data, write_recipe

from distill.cli import cli


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
# A read-only output: the suite runs as root, and chmod does not stop root writing, so outputs go below
# /sys (sysfs refuses mkdir even to root: EPERM) or below a regular file (ENOTDIR).
READ_ONLY = Path("/sys/distill-bad-input")


def _write(path: Path, text) -> Path:
    if not path.exists():
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _bert(t: Path) -> Path:
    bert = t / "bert"
    if not bert.exists():
        from transformers import BertConfig

        bert.mkdir()
        (bert / "config.json").write_text(json.dumps({**BertConfig(num_hidden_layers=1).to_dict(),
                                                      "architectures": ["BertModel"]}))
    return bert


def _truncated_model(t: Path, model: str) -> Path:
    """A copy of the tiny model whose model.safetensors is cut in half."""
    trunc = t / "truncated_model"
    if not trunc.exists():
        shutil.copytree(model, trunc)
        st = trunc / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    return trunc


def fixtures(env) -> dict:
    """The broken files the cases point at (made once per module)."""
    t, model = env["tmp"], env["model"]
    f = {"bert": _bert(t), "truncated": _truncated_model(t, model), "export_src": t / "export_src"}
    if not f["export_src"].exists():  # its own copy: an export that wrongly writes into its source spoils no other case
        shutil.copytree(model, f["export_src"])
    for name in ("empty_model_dir", "empty_cache"):
        f[name] = t / name
        f[name].mkdir(exist_ok=True)
    f["a_file"] = _write(t / "a_file.txt", "x")  # an --out below a file: a path that cannot be written, even as root
    specs = {"no_source": "name: x\nbackend: transformers\n",
             "bad_backend": f"name: x\nsource: {model}\nbackend: tensorrt\n",
             "bad_gpu": f"name: x\nsource: {model}\ngpu_memory_utilization: 1.5\n",
             "unknown_key": f"name: x\nsource: {model}\nmax_logprob: 5\n",
             "small_logprobs": f"name: small\nsource: {model}\nbackend: transformers\nmax_logprobs: 5\n",
             "not_yaml": "train:\n  lr: [1, 2\n", "a_list": "- name: x\n- workdir: y\n", "empty": "",
             "only_comments": "# nothing here\n"}
    for name, text in specs.items():
        f[name] = _write(t / f"{name}.yaml", text)
    labels = {"dup.json": '["billing", "login", "billing"]', "dup.txt": "billing\nlogin\nbilling\n",
              "bad.json": '["billing", "login"', "blank.json": "", "object.json": '{"billing": 0, "login": 1}'}
    for name, text in labels.items():
        f[f"labels-{name}"] = _write(t / f"labels-{name}", text)
    f["fake.gguf"] = _write(t / "fake.gguf", "this is not a GGUF file\n")
    f["gen_data"] = _write(t / "gen.jsonl", "".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    return f


def gen(recipe, *args):
    return ["generate", str(recipe), "--backend", "transformers", *args]


def labels_recipe(env, name, path):
    return recipe_with(env, name, task={"labels": None, "labels_file": str(path)})


def data_cases(env, f):
    """Data and labels files, through generate."""
    t = env["tmp"]
    return [
        ("malformed JSON line", gen(recipe_with(env, "m1", data_text=GOOD + '{"text": "x", "label"\n')), 2,
         "m1.jsonl:2: not valid JSON"),
        ("non-UTF-8 bytes",
         gen(recipe_with(env, "m2", data_text=GOOD.encode() + b'{"text": "\xff", "label": "billing"}\n')), 2,
         "m2.jsonl:2: not UTF-8"),
        ("empty file", gen(recipe_with(env, "m3", data_text="")), 2, "m3.jsonl: the file is empty"),
        ("blank lines only", gen(recipe_with(env, "m4", data_text="\n\n")), 2, "m4.jsonl: no examples"),
        ("missing text field", gen(recipe_with(env, "m5", data_text=GOOD + '{"label": "billing"}\n')), 2,
         "m5.jsonl:2: missing field 'text'"),
        ("missing label field", gen(recipe_with(env, "m6", data_text=GOOD + '{"text": "hi"}\n')), 2,
         "m6.jsonl:2: missing field 'label'"),
        ("empty text", gen(recipe_with(env, "m7", data_text=GOOD + '{"text": "  ", "label": "billing"}\n')), 2,
         "m7.jsonl:2: field 'text' is empty"),
        ("label outside the label set",
         gen(recipe_with(env, "m8", data_text=GOOD + '{"text": "hi", "label": "weather"}\n')), 2,
         "m8.jsonl:2: label 'weather' is not in the label set"),
        ("a JSON array instead of an object", gen(recipe_with(env, "m9", data_text=GOOD + '["hi", "billing"]\n')), 2,
         "m9.jsonl:2: expected a JSON object"),
        ("non-text field value",
         gen(recipe_with(env, "m10", data_text=GOOD + '{"text": {"a": 1}, "label": "billing"}\n')), 2,
         "m10.jsonl:2: field 'text' must be text"),
        ("CSV row with an extra column",
         gen(recipe_with(env, "m11", data_text="text,label\nhi,billing\nyo,billing,extra\n", data_suffix=".csv")), 2,
         "m11.csv:3: more fields than the header"),
        ("CSV missing the label column", gen(recipe_with(env, "m12", data_text="text\nhi\n", data_suffix=".csv")), 2,
         "m12.csv:2: missing field 'label'"),
        ("CSV missing the text column", gen(recipe_with(env, "m16", data_text="label\nbilling\n", data_suffix=".csv")),
         2, "m16.csv:2: missing field 'text'"),
        ("nonexistent data path", gen(recipe_with(env, "m13", task={"data": str(t / "nope.jsonl")})), 2,
         "nope.jsonl: no such file"),
        ("data path that is a directory", gen(recipe_with(env, "m17", task={"data": str(f["empty_model_dir"])})), 2,
         "empty_model_dir"),
        ("unknown built-in dataset", gen(recipe_with(env, "m14", task={"data": "builtin:imdb"})), 2,
         "builtin:imdb: unknown built-in dataset"),
        ("unknown task type", gen(recipe_with(env, "m15", task={"type": "regression"})), 2,
         "task.type: expected one of classification, generation, got 'regression'"),
        ("generation rows without prompts", gen(recipe_with(env, "m18", task={"type": "generation"})), 2,
         "missing field 'prompt'"),
        ("duplicate label in a labels file", gen(labels_recipe(env, "l1", f["labels-dup.json"])), 2,
         "labels-dup.json: label 'billing' appears more than once"),
        ("duplicate label in a text labels file", gen(labels_recipe(env, "l2", f["labels-dup.txt"])), 2,
         "labels-dup.txt: label 'billing' appears more than once"),
        ("malformed labels.json", gen(labels_recipe(env, "l3", f["labels-bad.json"])), 2,
         "labels-bad.json:1: not valid JSON"),
        ("blank labels.json", gen(labels_recipe(env, "l4", f["labels-blank.json"])), 2,
         "labels-blank.json: the labels file is empty"),
        ("labels.json holding an object", gen(labels_recipe(env, "l5", f["labels-object.json"])), 2,
         "labels-object.json: expected a JSON list of label names"),
        ("nonexistent labels file", gen(labels_recipe(env, "l6", t / "labels-nope.json")), 2, "labels-nope.json"),
    ]


def recipe_cases(env, f):
    """Recipes, --set and teacher specs, through generate."""
    t, good = env["tmp"], str(env["recipe"])
    return [
        ("nonexistent recipe", gen(t / "missing.yaml"), 2, "missing.yaml: no such file"),
        ("invalid YAML", gen(f["not_yaml"]), 2, "not_yaml.yaml:"),
        ("a recipe that is a YAML list", gen(f["a_list"]), 2,
         "a_list.yaml: expected a mapping of keys at the top level"),
        ("an empty recipe file", gen(f["empty"]), 2, "empty.yaml: the recipe is empty"),
        ("a recipe of comments only", gen(f["only_comments"]), 2, "only_comments.yaml: the recipe is empty"),
        ("unknown top-level key", gen(recipe_with(env, "r1", top={"trian": {}})), 2,
         "unknown key 'trian' (did you mean 'train'?)"),
        ("mistyped nested key", gen(recipe_with(env, "r2", train={"learnig_rate": 1})), 2,
         "unknown key 'train.learnig_rate'"),
        ("wrong value type", gen(recipe_with(env, "r3", train={"epochs": "many"})), 2,
         "train.epochs: expected a number"),
        ("a section that is not a mapping", gen(recipe_with(env, "r7", top={"generate": [1, 2]})), 2,
         "r7.yaml: generate: expected a mapping"),
        ("extends cycle", gen(recipe_with(env, "x1", top={"extends": "x1.yaml"})), 2, "extends: a cycle"),
        ("extends a missing file", gen(recipe_with(env, "x2", top={"extends": "no-parent.yaml"})), 2,
         "no-parent.yaml: no such file"),
        ("extends that is not a path", gen(recipe_with(env, "x3", top={"extends": 5})), 2,
         "x3.yaml: extends: expected the path of another recipe"),
        ("max_length below 16", gen(recipe_with(env, "r4", task={"max_length": 8})), 2,
         "r4.yaml: task.max_length: expected at least 16, got 8"),
        ("negative split fraction", gen(recipe_with(env, "r5", task={"split": {"holdout": -0.1}})), 2,
         "task.split.holdout: expected a number in [0, 1)"),
        ("split fractions that leave no training data",
         gen(recipe_with(env, "r6", task={"split": {"validation": 0.6, "holdout": 0.4}})), 2,
         "validation + holdout must be below 1"),
        ("negative max_examples", gen(recipe_with(env, "r8", task={"max_examples": -5})), 2,
         "task.max_examples: expected at least 1, got -5"),
        ("duplicate label in task.labels", gen(good, "--set", "task.labels=[billing, login, billing]"), 2,
         "task.labels: expected distinct values"),
        ("empty task.labels through --set", gen(good, "--set", "task.labels=[]"), 2,
         "task.labels: expected at least one value"),
        ("a number for a list key through --set", gen(good, "--set", "generate.splits=5"), 2,
         "--set generate.splits=5: generate.splits: expected a list, got 5"),
        ("a wrong item in a list key through --set", gen(good, "--set", "generate.splits=[train, test]"), 2,
         "generate.splits[1]: expected one of train, validation"),
        ("generate.top_p of 0 through --set", gen(good, "--set", "generate.top_p=0"), 2,
         "--set generate.top_p=0: generate.top_p: expected a number in (0, 1]"),
        ("mistyped key through --set", gen(good, "--set", "generate.kk=3"), 2,
         "unknown key 'generate.kk' (did you mean 'generate.k'?)"),
        ("wrong type through --set", gen(good, "--set", "generate.batch_size=many"), 2,
         "generate.batch_size: expected an integer, got 'many'"),
        ("--set without a value", gen(good, "--set", "generate.k"), 2, "expected KEY=VALUE"),
        ("--set with invalid YAML", gen(good, "--set", "task.labels=[a, b"), 2,
         "--set task.labels=[a, b: the value is not valid YAML"),
        ("teacher spec without a source", gen(good, "--teacher", str(f["no_source"])), 2,
         "no_source.yaml: source: expected"),
        ("unknown backend in a teacher spec", gen(good, "--teacher", str(f["bad_backend"])), 2,
         "bad_backend.yaml: backend: expected one of"),
        ("unknown key in a teacher spec", gen(good, "--teacher", str(f["unknown_key"])), 2,
         "unknown_key.yaml: unknown key 'max_logprob' (did you mean 'max_logprobs'?)"),
        ("teacher spec with gpu_memory_utilization above 1", gen(good, "--teacher", str(f["bad_gpu"])), 2,
         "bad_gpu.yaml: gpu_memory_utilization: expected a number in (0, 1]"),
        ("teacher spec that is a YAML list", gen(good, "--teacher", str(f["a_list"])), 2,
         "a_list.yaml: expected a mapping"),
    ]


def generate_cases(env, f):
    t, good = env["tmp"], str(env["recipe"])
    gen_recipe = recipe_with(env, "g1", task={"type": "generation", "data": str(f["gen_data"]), "labels": None})
    return [
        ("teacher directory without config.json", gen(good, "--teacher", str(f["empty_model_dir"])), 2,
         "not a model directory (no config.json)"),
        ("nonexistent teacher directory", gen(good, "--teacher", str(t / "no_model_here")), 2,
         "no_model_here: no such model directory"),
        ("cache of another teacher", gen(good, "--teacher", str(f["bert"])), 2,
         "w/cache: made by a different teacher run"),
        ("generate k of 0", gen(good, "--k", "0"), 2, "--k"),
        ("generate k above the teacher's max_logprobs",
         gen(gen_recipe, "--teacher", str(f["small_logprobs"]), "--k", "10"), 2,
         "k=10 is above the teacher's max_logprobs=5"),
        ("generate batch size 0", gen(good, "--batch-size", "0"), 2, "--batch-size"),
        ("cache directory that is a file", gen(good, "--out", str(f["a_file"])), 2, "a_file.txt"),
        ("read-only cache directory (below /sys)", gen(good, "--out", str(READ_ONLY / "cache")), 2, str(READ_ONLY)),
        ("--teacher-url that is not a URL", ["generate", good, "--teacher-url", "localhost"], 2,
         "teacher url 'localhost': expected http://HOST:PORT"),
        ("a GGUF teacher that does not exist", gen(good, "--teacher", str(t / "none.gguf")), 2,
         "none.gguf: no such file"),
    ]


def train_cases(env, f):
    t, good = env["tmp"], str(env["recipe"])
    return [
        ("negative learning rate", ["train", good, "--lr", "-1"], 2,
         "--lr: train.lr: expected a number in (0, 1], got -1.0"),
        ("negative seed", ["train", good, "--seed", "-1"], 2, "--seed: train.seed: expected a number in [0, "),
        ("zero student layers", ["train", good, "--num-layers", "0"], 2,
         "train.student.num_layers: expected at least 1, got 0"),
        ("negative train_examples", ["train", good, "--train-examples", "-3"], 2,
         "train.train_examples: expected at least 1, got -3"),
        ("zero epochs", ["train", good, "--epochs", "0"], 2, "--epochs: train.epochs: expected a number > 0"),
        ("batch size 0", ["train", good, "--batch-size", "0"], 2,
         "--batch-size: train.batch_size: expected at least 1, got 0"),
        ("temperature 0", ["train", good, "--temperature", "0"], 2,
         "--temperature: train.temperature: expected at least 0.05, got 0.0"),
        ("max-steps 0", ["train", good, "--max-steps", "0"], 2, "--max-steps: train.max_steps: expected at least 1"),
        ("negative max_grad_norm", ["train", recipe_with(env, "t6", train={"max_grad_norm": -1})], 2,
         "t6.yaml: train.max_grad_norm: expected a number > 0"),
        ("LoRA rank 0", ["train", good, "--set", "train.lora.r=0"], 2, "train.lora.r: expected at least 1, got 0"),
        ("LoRA rank 0 in the recipe", ["train", recipe_with(env, "t8", train={"lora": {"r": 0}})], 2,
         "t8.yaml: train.lora.r: expected at least 1, got 0"),
        ("LoRA dropout of 1", ["train", good, "--set", "train.lora.dropout=1"], 2,
         "train.lora.dropout: expected a number in [0, 1)"),
        ("LoRA target_modules that is not a list", ["train", good, "--set", "train.lora.target_modules=q_proj"], 2,
         "train.lora.target_modules: expected a list, got 'q_proj'"),
        ("repeated student layer", ["train", good, "--set", "train.student.from_teacher_layers=[0, 0]"], 2,
         "from_teacher_layers: expected distinct values"),
        ("empty from_teacher_layers", ["train", recipe_with(env, "t9", train={"student": {"from_teacher_layers": []}})],
         2, "t9.yaml: train.student.from_teacher_layers: expected at least one value"),
        ("negative student layer", ["train", good, "--set", "train.student.from_teacher_layers=[-1]"], 2,
         "train.student.from_teacher_layers[0]: expected at least 0, got -1"),
        ("val_f1 for a generation task",
         ["train", recipe_with(env, "t7", task={"type": "generation"}, train={"early_stopping_metric": "val_f1"})], 2,
         "val_f1 exists for classification only"),
        ("stop-after-steps of 0", ["train", good, "--stop-after-steps", "0"], 2, "--stop-after-steps"),
        ("alpha outside [0, 1]", ["train", good, "--alpha", "1.5"], 2, "train.alpha: expected a number in [0, 1]"),
        ("an unknown loss", ["train", good, "--loss", "kl"], 2, "'kl' is not one of"),
        ("no cache for distillation", ["train", recipe_with(env, "t1", top={"workdir": str(t / "fresh")})], 2,
         "not a teacher cache (no manifest.json)"),
        ("--cache an empty directory", ["train", good, "--cache", str(f["empty_cache"])], 2,
         "empty_cache: not a teacher cache (no manifest.json)"),
        ("--cache a file", ["train", good, "--cache", str(f["a_file"])], 2, "a_file.txt"),
        ("cache made for other data",
         ["train", recipe_with(env, "t2", data_text=GOOD * 1 + '{"text": "other", "label": "login"}\n'
                               + '{"text": "more", "label": "delivery"}\n' * 1
                               + "".join(json.dumps({"text": f"x{i}", "label": "login"}) + "\n" for i in range(9))),
          "--cache", str(t / "w" / "cache")], 2, "made for other data"),
        ("LoRA target that does not exist",
         ["train", recipe_with(env, "t3", train={"alpha": 0.0, "lora": {"target_modules": ["c_attn"]}})], 2,
         "train.lora.target_modules: ['c_attn'] not found"),
        ("more student layers than the teacher has", ["train", good, "--num-layers", "9"], 2,
         "train.student.num_layers: expected 1..2"),
        ("student layer index out of range",
         ["train", recipe_with(env, "t4", train={"student": {"from_teacher_layers": [0, 5]}})], 2,
         "out of range; the teacher has 2 layers"),
        ("student that is not a causal LM",
         ["train", recipe_with(env, "t5", train={"alpha": 0.0, "student": {"model": str(f["bert"])}})], 2,
         "not a causal language model"),
        ("--init-from a missing directory", ["train", good, "--init-from", str(t / "no_init")], 2,
         "no_init: no such model directory"),
        ("--init-from a truncated model",
         ["train", good, "--init-from", str(f["truncated"]), "--out", str(t / "out-trunc")], 2, "model.safetensors"),
    ]


def eval_cases(env, f):
    t, good, model = env["tmp"], str(env["recipe"]), env["model"]
    ev = lambda m, *a: ["eval", str(m), "--recipe", good, *a]  # noqa: E731
    return [
        ("eval of a nonexistent model", ev(t / "nothing"), 2, "nothing: no such model directory"),
        ("eval file with an unknown label",
         ev(model, "--data",
            str(recipe_with(env, "e1", data_text=GOOD + '{"text": "a", "label": "sport"}\n')
                .replace(".yaml", ".jsonl"))),
         2, "e1.jsonl:2: label 'sport'"),
        ("eval of a missing GGUF file", ev(t / "model.gguf"), 2, "model.gguf"),
        ("eval of a file that is not GGUF", ev(f["fake.gguf"]), 2, "fake.gguf"),
        ("few-shot eval of a generation recipe whose examples fill max_length",
         ["eval", model, "--shots", "2", "--recipe",
          recipe_with(env, "e2", task={"type": "generation", "prompt": "Write a message.", "response_field": "text",
                                       "max_length": 16})],
         2, "with 2 few-shot examples fills max_length=16"),
        ("eval with an unknown split", ev(model, "--split", "test"), 2, "'test' is not one of"),
        ("eval batch size 0", ev(model, "--batch-size", "0"), 2, "--batch-size"),
        ("eval limit -1", ev(model, "--limit", "-1"), 2, "--limit"),
        ("eval negative shots", ev(model, "--shots", "-1"), 2, "--shots"),
        ("eval of a missing --data file", ev(model, "--data", str(t / "no_eval.jsonl")), 2,
         "no_eval.jsonl: no such file"),
        ("eval --data of blank lines", ev(model, "--data", str(_write(t / "blank_eval.jsonl", "\n \n"))), 2,
         "blank_eval.jsonl: no examples"),
        ("eval of a truncated model.safetensors", ev(f["truncated"], "--limit", "3", "--out", str(t / "ev-trunc")), 2,
         "model.safetensors"),
        ("eval of a directory that is not a model", ev(f["empty_model_dir"]), 2,
         "empty_model_dir: not a model directory"),
        ("eval of a model that is not a causal LM", ev(f["bert"]), 2, "bert"),
        ("eval --out below a file", ev(model, "--limit", "3", "--out", str(f["a_file"] / "report")), 2, "a_file.txt"),
        ("eval --out read-only (below /sys)", ev(model, "--limit", "3", "--out", str(READ_ONLY / "report")), 2,
         str(READ_ONLY)),
        ("eval --set of an unknown key", ev(model, "--set", "task.labelz=[a]"), 2, "unknown key 'task.labelz'"),
    ]


def export_cases(env, f):
    t, model = env["tmp"], env["model"]
    return [
        ("export --set without --recipe", ["export", model, "--out", str(t / "x.gguf"), "--set", "task.max_length=64"],
         2, "add --recipe"),
        ("export of an unsupported architecture", ["export", str(f["bert"]), "--out", str(t / "b.gguf")], 2,
         "supported"),
        ("export of a nonexistent directory", ["export", str(t / "nope_dir"), "--out", str(t / "x.gguf")], 2,
         "nope_dir"),
        ("export with an unknown quant type", ["export", model, "--quant", "q3_k", "--out", str(t / "x.gguf")], 2,
         "'q3_k' is not one of"),
        ("export of a truncated model.safetensors",
         ["export", str(f["truncated"]), "--quant", "f16", "--out", str(t / "trunc.gguf")], 2, "model.safetensors"),
        ("export of a directory that is not a model",
         ["export", str(f["empty_model_dir"]), "--quant", "f16", "--out", str(t / "e.gguf")], 2, "empty_model_dir"),
        ("export --out read-only (below /sys)",
         ["export", model, "--quant", "f16", "--no-verify", "--out", str(READ_ONLY / "m.gguf")], 2, str(READ_ONLY)),
        ("export --out below a file",
         ["export", model, "--quant", "f16", "--no-verify", "--out", str(f["a_file"] / "m.gguf")], 2, "a_file.txt"),
        ("export --out over the source weights",
         ["export", str(f["export_src"]), "--quant", "f16", "--no-verify", "--out",
          str(f["export_src"] / "model.safetensors")], 2, "lies inside the source model"),
        ("export with a missing --recipe",
         ["export", model, "--quant", "f16", "--out", str(t / "r.gguf"), "--recipe", str(t / "no_recipe.yaml")], 2,
         "no_recipe.yaml: no such file"),
    ]


def bench_cases(env, f):
    t, good, model = env["tmp"], str(env["recipe"]), env["model"]
    b = lambda *a: ["bench", "--recipe", good, *a]  # noqa: E731
    return [
        ("bench latency examples 0", b("--teacher", model, "--student", model, "--latency-examples", "0"), 2,
         "--latency-examples"),
        ("bench of a nonexistent student",
         b("--teacher", model, "--student", str(t / "ghost"), "--limit", "2", "--latency-examples", "1"), 2, "ghost"),
        ("bench of a nonexistent teacher",
         b("--teacher", str(t / "no_teacher"), "--student", model, "--limit", "2", "--latency-examples", "1"), 2,
         "no_teacher"),
        ("bench without a student", b("--teacher", model), 2, "--student"),
        ("bench batch size 0", b("--teacher", model, "--student", model, "--batch-size", "0"), 2, "--batch-size"),
        ("bench limit 0", b("--teacher", model, "--student", model, "--limit", "0"), 2, "--limit"),
        ("bench of a missing --data file",
         b("--teacher", model, "--student", model, "--data", str(t / "no_bench.jsonl"), "--latency-examples", "1"), 2,
         "no_bench.jsonl"),
        ("bench of a missing recipe",
         ["bench", "--recipe", str(t / "no_bench.yaml"), "--teacher", model, "--student", model], 2,
         "no_bench.yaml: no such file"),
    ]


def doctor_cases(env, f):
    """doctor reports a bad input as one FAIL row and exits 1 (or 2 for a misused option)."""
    t, good = env["tmp"], str(env["recipe"])
    d = lambda *a: ["doctor", "--no-estimate", *a]  # noqa: E731
    return [
        ("doctor of a missing GGUF teacher", d("--teacher", str(t / "x.gguf")), 1, "x.gguf: no such file"),
        ("doctor of a teacher file that is not GGUF", d("--teacher", str(f["fake.gguf"])), 1, "fake.gguf"),
        ("doctor of a URL where nothing listens", d("--teacher", "http://127.0.0.1:9"), 1, "http://127.0.0.1:9",
         {"within": 10}),
        ("doctor of a missing teacher directory", d("--teacher", str(t / "no_model_here")), 1,
         "no_model_here: no such model directory"),
        ("doctor of a teacher spec without a source", d("--teacher", str(f["no_source"])), 1,
         "no_source.yaml: source: expected"),
        ("doctor of a recipe with an unknown key", d("--recipe", recipe_with(env, "d1", top={"trian": {}})), 1,
         "d1.yaml: unknown key 'trian'"),
        ("doctor of a missing recipe", d("--recipe", str(t / "no_doctor.yaml")), 1, "no_doctor.yaml: no such file"),
        ("doctor of a recipe with a bad data file", d("--recipe", recipe_with(env, "d2", data_text=GOOD + "{oops\n")),
         1, "d2.jsonl:2: not valid JSON"),
        ("doctor --set without --recipe", d("--set", "generate.k=3"), 2, "distill doctor RECIPE --set"),
        ("doctor --set out of range", d("--recipe", good, "--set", "generate.k=0"), 2,
         "--set generate.k=0: generate.k: expected at least 1, got 0"),
        ("doctor of an empty cache directory", d("--cache", str(f["empty_cache"])), 1,
         "empty_cache: not a teacher cache (no manifest.json)"),
        ("doctor --cache a file", d("--cache", str(f["a_file"])), 2, "a_file.txt"),
        ("doctor of a student that is not a causal LM",
         d("--cache", str(t / "w" / "cache"), "--student", str(f["bert"])), 1,
         "bert: model type 'bert' is not a causal language model"),
    ]


def serve_cases(env, f):
    t, model = env["tmp"], env["model"]
    return [
        ("serve-teacher port out of range", ["serve-teacher", model, "--port", "70000"], 2, "--port"),
        ("serve-teacher port that is not a number", ["serve-teacher", model, "--port", "http"], 2, "--port"),
        ("serve-teacher of a missing teacher spec", ["serve-teacher", str(t / "no_spec.yaml")], 2,
         "no_spec.yaml: no such file"),
        ("serve-teacher of a spec with an unknown key", ["serve-teacher", str(f["unknown_key"])], 2,
         "unknown_key.yaml: unknown key 'max_logprob'"),
        ("serve-teacher of a directory that is not a model", ["serve-teacher", str(f["empty_model_dir"])], 2,
         "not a model directory (no config.json)"),
        ("serve-teacher of a missing directory", ["serve-teacher", str(t / "no_served")], 2,
         "no_served: no such model directory"),
        ("serve-teacher of a URL", ["serve-teacher", "http://127.0.0.1:9"], 2, "http://127.0.0.1:9: nothing to serve"),
    ]


TABLES = (data_cases, recipe_cases, generate_cases, train_cases, eval_cases, export_cases, bench_cases, doctor_cases,
          serve_cases)


def cases(env):
    f = fixtures(env)
    return [case for table in TABLES for case in table(env, f)]


def snapshot(*roots) -> dict:
    """Every file under `roots`: size, mtime and (below 4 MiB) a hash of its bytes."""
    out = {}
    for root in roots:
        for p in Path(root).rglob("*"):  # (a cache's .lock holds the pid of its last user: any run rewrites it)
            if p.is_file() and not p.is_symlink() and p.name != ".lock":
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 4 << 20 else None
                out[str(p)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def error_lines(text: str) -> list[str]:
    """The lines that report the failure: `error: ...` (ours), `Error: ...` (click's), doctor's FAIL rows."""
    return [ln for ln in text.splitlines() if ln.lower().startswith("error:") or ln.lstrip().startswith("FAIL ")]


def check_case(env, args, code, expected, within=None) -> tuple[list[str], str]:
    """The problems of one case (empty when it behaves) and its error line."""
    before = snapshot(env["tmp"], env["model"])
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, [str(a) for a in args])
    took = time.monotonic() - t0
    text = res.output  # stdout and stderr as a terminal shows them
    problems = []
    if res.exit_code != code:
        problems.append(f"exit {res.exit_code}, expected {code}")
    lines = error_lines(text)
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines, expected one")
    elif expected not in lines[0]:
        problems.append(f"error line lacks {expected!r}")
    if "Traceback" in text or not isinstance(res.exception, (SystemExit, type(None))):
        problems.append(f"raised {type(res.exception).__name__}: {res.exception}")
    if within is not None and took > within:
        problems.append(f"took {took:.1f} s, expected under {within} s")
    after = snapshot(env["tmp"], env["model"])
    changed = [p for p, sig in before.items() if after.get(p) != sig]
    if changed:
        problems.append(f"changed or removed {changed[:3]}")
    return [f"{p}\n    output: {text.strip()[-300:]}" for p in problems[:1]] + problems[1:], (lines or [""])[0]


def test_bad_input_table(env, monkeypatch):
    monkeypatch.chdir(env["tmp"])  # a case that wrongly runs writes its relative outputs (runs/...) here
    table = cases(env)
    per_command = Counter(args[0] for _, args, *_ in table)
    assert len(table) >= 90 and len({name for name, *_ in table}) == len(table)
    assert all(expected for _, _, _, expected, *_ in table)  # every case names what was wrong
    assert str(Path(env["model"]) / "model.safetensors") in snapshot(env["model"])  # the guard sees the weights
    assert set(per_command) == {"generate", "train", "eval", "export", "bench", "doctor", "serve-teacher"}
    failures, messages = [], {}
    for name, args, code, expected, *extra in table:
        within = extra[0].get("within") if extra else None
        problems, messages[name] = check_case(env, args, code, expected, within)
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    report = env["tmp"] / "bad_input_report.json"  # every case's message, to read the table's wording at once
    report.write_text(json.dumps({"cases": len(table), "per_command": per_command, "failures": failures,
                                  "messages": messages}, indent=1))
    assert not failures, f"{len(failures)} of {len(table)} cases failed:\n" + "\n".join(failures)


def test_duplicates_are_dropped_with_a_warning(env, caplog):
    r = recipe_with(env, "dup", data_text=GOOD * 2 + "".join(
        json.dumps({"text": f"t{i}", "label": ["billing", "login", "delivery"][i % 3]}) + "\n" for i in range(20)))
    from distill.config import load_recipe
    from distill.data.splits import prepare_splits

    rec = load_recipe(r)
    with caplog.at_level("WARNING"):
        s = prepare_splits(rec.task, rec.workdir)
    assert "dropped 1 duplicate" in caplog.text
    assert len(s.train) + len(s.validation) + len(s.holdout) == 21


def test_failed_generate_keeps_the_existing_cache(env):
    """A refused run (another teacher) leaves the finished cache byte for byte as it was."""
    cache = env["tmp"] / "w" / "cache"
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    res = CliRunner().invoke(cli, ["generate", str(env["recipe"]), "--teacher", str(env["tmp"] / "bert"),
                                   "--backend", "transformers"])
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


def _doctor_rows(args) -> tuple[int, dict]:
    res = CliRunner().invoke(cli, ["doctor", "--no-estimate", "--json", *args])
    return res.exit_code, {c["check"]: c for c in json.loads(res.output[res.output.index("[\n"):])}


def test_doctor_accepts_another_tokenizer_for_soft_labels_only(env, tmp_path):
    """Soft labels are a distribution over label names, which a student of any tokenizer learns (train
    accepts it); a top-k cache holds the teacher's token ids, so there doctor refuses another tokenizer."""
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(env["model"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<a-token-the-teacher-lacks>"])
    tok.save_pretrained(other)
    cache = env["tmp"] / "w" / "cache"
    code, rows = _doctor_rows(["--cache", str(cache), "--student", str(other)])
    assert code == 0 and rows["student"]["status"] == "ok", rows
    assert "another tokenizer" in rows["student"]["detail"] and "fine for soft labels" in rows["student"]["detail"]
    topk = tmp_path / "topk"
    shutil.copytree(cache, topk)
    manifest = json.loads((topk / "manifest.json").read_text())
    (topk / "manifest.json").write_text(json.dumps({**manifest, "kind": "topk", "k": 4, "labels": None}))
    code, rows = _doctor_rows(["--cache", str(topk), "--student", str(other)])
    assert code == 1 and rows["student"]["status"] == "FAIL" and "top-k cache" in rows["student"]["detail"]
    code, rows = _doctor_rows(["--cache", str(topk), "--student", env["model"]])
    assert code == 0 and rows["student"]["status"] == "ok" and "matches" in rows["student"]["detail"]


def test_doctor_probes_a_url_teacher_as_a_server(env):
    """A bare URL is asked what it serves (one request, no hub lookup); with no local tokenizer the
    tokenizer check is reported as not done, a warning rather than a pass."""
    import http.server
    import threading

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            body = json.dumps({"data": [{"id": "tiny-teacher"}]}).encode() if self.path == "/v1/models" else b"{}"
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, rows = _doctor_rows(["--teacher", url + "/v1"])
    finally:
        server.shutdown()
    assert code == 0 and rows["teacher"]["status"] == "warn", rows
    assert f"{url} serves tiny-teacher" in rows["teacher"]["detail"] and "not checked" in rows["teacher"]["detail"]
