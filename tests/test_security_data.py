"""Labels that cannot collide and text that cannot crash (issue 35, items 5 and 7, the data side).

The table runs the real CLI (`distill generate --backend transformers` on the tiny model, in-process) and
each case must stop with exit status 2 or 1, one error line naming what was wrong, no traceback, and every
file that existed before (the data, the recipes, the model and a good work directory's split files)
unchanged by hash. The unit tests below it pin the collision rules themselves."""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_class_data, write_recipe
from test_bad_input import check_case, error_lines, recipe_with, snapshot

import distill.data.prompts as prompts
from distill.cli import cli
from distill.config import TaskConfig, load_recipe
from distill.data.read import check_label_names, label_key, label_problem, label_set, read_rows, validate_rows
from distill.data.splits import prepare_splits
from distill.errors import UsageError
from distill.models.label_tokens import check_label_collisions, label_token_ids

GOOD = '{"text": "card charged twice", "label": "billing"}\n{"text": "where is my parcel", "label": "delivery"}\n'
THREE = ["billing", "delivery", "login"]  # the labels of write_class_data
LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    """A good recipe whose work directory already holds its split files (a refused run must not touch them)."""
    tmp = tmp_path_factory.mktemp("secdata")
    data = write_class_data(tmp / "good.jsonl")
    recipe = write_recipe(tmp / "good.yaml", data, tmp / "w", tiny_model, student={"num_layers": 1})
    r = load_recipe(recipe)
    prepare_splits(r.task, r.workdir, str(recipe))
    assert (tmp / "w" / "data" / "split.json").is_file()
    return {"tmp": tmp, "data": data, "recipe": recipe, "model": tiny_model, "workdir": str(tmp / "w")}


def gen(recipe, *args):
    return ["generate", str(recipe), "--backend", "transformers", *args]


def _file(env, name: str, text: str) -> Path:
    p = env["tmp"] / name
    p.write_text(text, encoding="utf-8")
    return p


def _rows(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _model_with_template(env, name: str, template: str) -> str:
    """The tiny model with another chat template: its files hard-linked, chat_template.jinja its own."""
    d = env["tmp"] / name
    d.mkdir()
    for f in Path(env["model"]).iterdir():
        if f.name != "chat_template.jinja":
            try:
                os.link(f, d / f.name)
            except OSError:  # another file system
                shutil.copy(f, d / f.name)
    (d / "chat_template.jinja").write_text(template)
    return str(d)


def _in_good_workdir(env, name, **kw) -> str:
    """A broken recipe that shares the good work directory: refused before the splits are written, its
    split files stay as they are."""
    return recipe_with(env, name, top={"workdir": env["workdir"]}, **kw)


def _labels(env, name, labels) -> list:
    return gen(_in_good_workdir(env, name, task={"labels": labels}))


def _labels_file(env, name, text) -> list:
    return gen(recipe_with(env, name, task={"labels": None, "labels_file": str(_file(env, name, text))}))


def _data(env, name, *rows, labels=THREE) -> list:
    return gen(_in_good_workdir(env, name, task={"labels": labels}, data_text=GOOD + _rows(*rows)))


def label_cases(env):
    """Labels that would collide: with each other, with the tokenizer's own tokens; empty, multi-line, typed."""
    return [
        ("label equal to the end-of-turn token", gen(recipe_with(env, "t1", task={"labels": THREE + ["<|im_end|>"]})),
         2, "label '<|im_end|>' is the end-of-turn token of the tokenizer"),
        ("label equal to a special token, from a labels file",
         _labels_file(env, "t2.txt", "billing\ndelivery\nlogin\n<|im_start|>\n"),
         2, "label '<|im_start|>' is a special token of the tokenizer"),
        ("label equal to another added token", gen(recipe_with(env, "t3", task={"labels": THREE + ["<repo_name>"]})),
         2, "label '<repo_name>' is already a token of the tokenizer"),
        ("labels differing in case in task.labels", _labels(env, "c1", ["billing", "Billing", "login"]),
         2, "labels 'billing' (task.labels[0]) and 'Billing' (task.labels[1]) differ only in case or spacing"),
        ("labels differing in case in a JSON labels file", _labels_file(env, "c2.json", '["billing", "BILLING"]'),
         2, "c2.json: labels 'billing' (item 1) and 'BILLING' (item 2) differ only in case"),
        ("labels differing in case and spacing in a text labels file",
         _labels_file(env, "c3.txt", "on hold\nlogin\nOn  Hold\n"),
         2, "c3.txt: labels 'on hold' (line 1) and 'On  Hold' (line 3) differ only in case or spacing"),
        ("labels differing in case in the data rows", _data(env, "c4", {"text": "hm", "label": "Billing"}, labels=None),
         2, "c4.jsonl:3: label 'Billing' and label 'billing' (line 1) differ only in case or spacing"),
        ("label with a trailing space in the data rows",
         _data(env, "c5", {"text": "hm", "label": "billing "}, labels=None),
         2, "c5.jsonl:3: label 'billing ' has spaces at its start or end"),
        ("empty label in task.labels", _labels(env, "e1", ["billing", "", "login"]),
         2, "label '' (task.labels[1]) is empty"),
        ("empty label in the data rows", _data(env, "e2", {"text": "hm", "label": ""}, labels=None),
         2, "e2.jsonl:3: field 'label' is empty"),
        ("multi-line label in task.labels", _labels(env, "n1", ["billing", "bill\ning"]),
         2, "label 'bill\\ning' (task.labels[1]) holds a line break (U+000A)"),
        ("multi-line label in the data rows", _data(env, "n2", {"text": "hm", "label": "a\nb"}, labels=None),
         2, "n2.jsonl:3: label 'a\\nb' holds a line break"),
        ("control character in a JSON labels file", _labels_file(env, "n3.json", '["billing", "lo\\u0000gin"]'),
         2, "(item 2) holds a control character (U+0000)"),
        ("YAML booleans as labels ([yes, no])", gen(_yaml_labels(env, "y1", "[yes, no]")),
         2, "task.labels[0]: expected a string, got True"),
        ("YAML numbers as labels ([01, 02])",
         gen(_yaml_labels(env, "y2", "[01, 02]", data=_rows({"text": "a", "label": "01"}, {"text": "b", "label": "2"})
                          )),
         2, "task.labels[0]: expected a string, got the number 1 (YAML reads unquoted digits as a number"),
    ]


def _yaml_labels(env, name: str, labels: str, data: str | None = None) -> str:
    """A recipe whose task.labels is written as YAML text, unquoted (as a user would type it)."""
    path = _in_good_workdir(env, name, data_text=data)
    r = yaml.safe_load(Path(path).read_text())
    r["task"]["labels"] = "LABELS"
    Path(path).write_text(yaml.safe_dump(r).replace("LABELS", labels))
    return path


def _with_template(env, name: str, template: str) -> list:
    model = _model_with_template(env, name, template)
    return gen(env["recipe"], "--teacher", model, "--out", env["tmp"] / f"{name}-cache")


def text_cases(env):
    """Texts, label sets and templates that used to end in an internal error or a hang."""
    many = [f"intent_{i:04d}" for i in range(1000)]
    many_rows = _rows(*({"text": f"t{i}", "label": many[i % 40]} for i in range(120)))
    return [
        ("lone surrogate in a text",
         gen(_in_good_workdir(env, "s1", data_text=GOOD + '{"text": "a \\ud800 b", "label": "billing"}\n')),
         2, "s1.jsonl:3: field 'text' holds a lone surrogate (U+D800) at character 3"),
        ("lone surrogate in a label", gen(_in_good_workdir(env, "s2", task={"labels": None},
                                                           data_text=GOOD + '{"text": "hm", "label": "\\udfff"}\n')),
         2, "s2.jsonl:3: field 'label' holds a lone surrogate (U+DFFF)"),
        ("lone surrogate in a labels file", _labels_file(env, "s3.json", '["billing", "\\ud83d"]'),
         2, "(item 2) holds a lone surrogate (not Unicode text) (U+D83D)"),
        ("lone surrogate in task.instruction",
         gen(_in_good_workdir(env, "s4", task={"instruction": "Classify \ud800 it"})),
         2, "s4.yaml: task.instruction: holds a lone surrogate (U+D800) at character 10"),
        ("a text that is a list of ints", _data(env, "i1", {"text": [101, 2023, 102], "label": "billing"}),
         2, "i1.jsonl:3: field 'text' must be text, got list [101, 2023, 102]"),
        ("a text that is a float", _data(env, "i2", {"text": 1.5, "label": "billing"}),
         2, "i2.jsonl:3: field 'text' must be text, got float"),
        ("a label that is a list", _data(env, "i3", {"text": "hm", "label": ["billing"]}),
         2, "i3.jsonl:3: field 'label' must be text, got list"),
        ("1,000 labels listed in a prompt that max_length cannot hold",
         gen(recipe_with(env, "k1", task={"labels": many}, data_text=many_rows)),
         2, "task.max_length: 96 tokens cannot hold any text: the prompt without it (the instruction, the list of "
            "1000 labels) takes"),
        ("a chat template that never ends", _with_template(env, "loop_model", LOOP),
         2, "the tokenizer's chat template did not finish rendering within 1 s", {"within": 120}),
        ("a chat template that raises", _with_template(env, "raise_model", "{{ raise_exception('no system role') }}"),
         2, "the tokenizer's chat template failed to render (TemplateError: no system role)"),
    ]


def test_security_data_table(env, monkeypatch):
    monkeypatch.chdir(env["tmp"])
    monkeypatch.setattr(prompts, "TEMPLATE_TIMEOUT_S", 1.0)  # the looping template: fail in 1 s, not 10
    table = label_cases(env) + text_cases(env)
    assert len(table) >= 12 and len({name for name, *_ in table}) == len(table)
    good_splits = snapshot(env["workdir"])
    assert str(Path(env["workdir"]) / "data" / "split.json") in good_splits  # the guard sees the split files
    failures = []
    for name, args, code, expected, *extra in table:
        problems, _ = check_case(env, args, code, expected, extra[0].get("within") if extra else None)
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    assert not failures, f"{len(failures)} of {len(table)} cases failed:\n" + "\n".join(failures)
    assert snapshot(env["workdir"]) == good_splits


def test_a_refused_label_names_both_labels_and_exits_2_without_a_traceback(env):
    """One case end to end, as a user sees it (the table checks the rest the same way)."""
    res = CliRunner().invoke(cli, gen(recipe_with(env, "one", task={"labels": ["login", "LOGIN"]})))
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert "'login'" in line and "'LOGIN'" in line and "task.labels[1]" in line


# --- the collision rules ----------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [("billing", "Billing"), ("on hold", "on  hold"), ("on hold", "On\u00a0Hold"),
                                  ("file", "\ufb01le"), ("billing", "\uff42illing"), ("STRASSE", "strasse")])
def test_labels_one_after_case_and_whitespace_are_refused(a, b):
    assert label_key(a) == label_key(b)
    with pytest.raises(UsageError, match=r"labels\.txt: labels .* \(line 1\) and .* \(line 2\) differ only in case"):
        check_label_names([(a, "line 1"), (b, "line 2")], "labels.txt")


def test_distinct_labels_pass_in_their_order():
    names = ["bill", "billing", "billing_v2", "b-illing", "Ärger", "ärgern", "1", "01"]
    assert check_label_names([(x, f"item {i}") for i, x in enumerate(names)], "f") == names
    with pytest.raises(UsageError, match=r"label 'bill' appears more than once \(item 0 and item 2\)"):
        check_label_names([("bill", "item 0"), ("x", "item 1"), ("bill", "item 2")], "f")


@pytest.mark.parametrize("label, problem", [
    ("", "is empty"), ("   ", "is empty"), ("a\nb", "line break (U+000A)"), ("a\rb", "line break (U+000D)"),
    ("a\u2028b", "line break (U+2028)"), ("a\tb", "control character (U+0009)"),
    ("a\x00b", "control character (U+0000)"), ("\ud800", "lone surrogate"),
    (" billing", "spaces at its start or end"), ("billing ", "spaces at its start or end"),
    (True, "is bool True, not text"), (1, "is int 1, not text"), (None, "is NoneType None"),
])
def test_label_problems(label, problem):
    assert problem in label_problem(label)


@pytest.mark.parametrize("label", ["billing", "on hold", "Kündigung", "請求", "a/b", "<billing>", "😀 happy"])
def test_usable_labels_have_no_problem(label):
    assert label_problem(label) is None


def test_labels_file_refusals_name_the_line(tmp_path):
    def labels(text, suffix):
        p = tmp_path / f"labels{suffix}"
        p.write_text(text, encoding="utf-8")
        return label_set(TaskConfig(data="x.jsonl", labels_file=str(p)), "r.yaml")

    assert labels("billing\n  login  \n\nrefund\r\n", ".txt") == ["billing", "login", "refund"]  # layout, not names
    with pytest.raises(UsageError, match=r"labels\.txt: label 'lo\\x0bgin' \(line 2\) holds a control character"):
        labels("billing\nlo\x0bgin\n", ".txt")
    with pytest.raises(UsageError, match=r"labels\.json: label 1 \(item 2\) is int 1, not text"):
        labels('["billing", 1]', ".json")
    with pytest.raises(UsageError, match=r"labels\.json: label '' \(item 1\) is empty"):
        labels('["", "billing"]', ".json")


def test_a_data_label_near_the_label_set_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(_rows({"text": "a", "label": "billing"}, {"text": "b", "label": "Login"}))
    with pytest.raises(UsageError, match=r"d\.jsonl:2: label 'Login' is not in the label set .*did you mean 'login'"):
        validate_rows(read_rows(p), TaskConfig(data=str(p)), ["billing", "login"], p)


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("row, expected", [
    ({"text": "a \ud800"}, r"d\.jsonl:2: field 'text' holds a lone surrogate \(U\+D800\) at character 3"),
    ({"text": [1, 2]}, r"d\.jsonl:2: field 'text' must be text, got list \[1, 2\]"),
    ({"other": "x"}, r"d\.jsonl:2: missing field 'text'"),
])
def test_texts_under_a_fixed_prompt_are_checked_like_any_text(tmp_path, row, expected):
    p = tmp_path / "d.jsonl"
    p.write_text(_rows({"text": "fine"}, row))
    task = TaskConfig(type="generation", data=str(p), prompt="Write a support message.", response_field="text")
    with pytest.raises(UsageError, match=expected):
        validate_rows(read_rows(p), task, None, p)


def test_the_tokenizers_own_tokens_are_refused_as_labels(smollm2_tok):
    tok = smollm2_tok
    for lab, what in [("<|im_end|>", "the end-of-turn token"), ("<|endoftext|>", "a special token"),
                      ("<|im_start|>", "a special token")]:
        with pytest.raises(UsageError, match=f"label '{lab}' is {what} of the tokenizer"):
            check_label_collisions(tok, ["billing", lab])
    with pytest.raises(UsageError, match="label '<file_sep>' is already a token of the tokenizer"):
        label_token_ids(tok, ["<file_sep>", "billing"])
    assert label_token_ids(tok, ["billing", "im_end", "|im_end|"]) is None  # plain text near a control token: fine
    assert label_token_ids(tok, ["<|im_end|>x", "billing"]) is None


def test_a_label_token_tokenizer_passes_and_a_control_token_among_its_labels_does_not(smollm2_tok):
    """A model that distill gave label tokens has one added token per label: that is not a collision. A
    control token in such a set still is, and so is a partial overlap with the label tokens."""
    import copy

    from tokenizers import AddedToken

    tok = copy.deepcopy(smollm2_tok)
    labels = [f"intent_{i:04d}" for i in range(1000)]
    tok.add_tokens([AddedToken(x, special=True, normalized=False) for x in labels], special_tokens=True)
    ids = label_token_ids(tok, labels)  # 1,000 labels: one added token each, one position to score
    assert len(set(ids)) == 1000 and min(ids) >= 49152
    assert prompts.label_answers(tok, TaskConfig(), labels) == [[i] for i in ids]
    with pytest.raises(UsageError, match="label '<|im_end|>' is the end-of-turn token"):
        label_token_ids(tok, labels[:3] + ["<|im_end|>"])
    with pytest.raises(UsageError, match="already a token of the tokenizer"):
        label_token_ids(tok, labels[:3] + ["not_a_label_token"])


def test_a_thousand_labels_are_read_validated_and_split(tmp_path):
    """No limit on the number of labels: label tokens score any number in one pass; what bounds them is
    the prompt that lists them (refused with a clear line when max_length cannot hold it, see the table)."""
    labels = [f"intent_{i:04d}" for i in range(1000)]
    p = tmp_path / "d.jsonl"
    p.write_text(_rows(*({"text": f"text {i}", "label": labels[i % 1000]} for i in range(3000))))
    task = TaskConfig(data=str(p), labels=labels)
    s = prepare_splits(task, tmp_path / "w", write=False)
    assert s.labels == labels and len(s.train) + len(s.validation) + len(s.holdout) == 3000
    assert {ex["label"] for ex in s.train} == set(labels)


def test_prepare_splits_without_writing(tmp_path, env):
    """write=False (`distill doctor`) gives the same splits and fingerprint as a run that writes, and
    creates nothing."""
    task = load_recipe(env["recipe"]).task
    work = tmp_path / "w"
    dry = prepare_splits(task, work, "r.yaml", write=False)
    assert not work.exists()
    wet = prepare_splits(task, work, "r.yaml")
    assert (dry.train, dry.validation, dry.holdout, dry.labels, dry.fingerprint) == (
        wet.train, wet.validation, wet.holdout, wet.labels, wet.fingerprint)
    assert json.loads((work / "data" / "split.json").read_text())["fingerprint"] == dry.fingerprint
    assert prepare_splits(task, None, "r.yaml", write=False).fingerprint == dry.fingerprint  # no workdir needed


def test_a_split_json_that_is_not_an_object_is_rewritten(tmp_path, env):
    task = load_recipe(env["recipe"]).task
    meta = tmp_path / "data" / "split.json"
    meta.parent.mkdir()
    meta.write_text('"a JSON string"')
    s = prepare_splits(task, tmp_path, "r.yaml")
    assert json.loads(meta.read_text())["fingerprint"] == s.fingerprint


class _LoopingTokenizer:
    name_or_path = "looping"
    chat_template = LOOP

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        while True:  # as a template's endless loop: Python bytecode, which the alarm interrupts
            pass


def test_template_rendering_times_out_and_restores_the_callers_timer(monkeypatch):
    """The deadline is a SIGALRM timer (a stand-in tokenizer here: the table runs a real looping template):
    it fires, and a timer the caller had set is put back with its remaining time."""
    monkeypatch.setattr(prompts, "TEMPLATE_TIMEOUT_S", 0.3)
    fired = []

    def handler(*a):
        fired.append(1)

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(UsageError, match="looping: the tokenizer's chat template did not finish rendering "
                                             "within 0.3 s"):
            prompts.render_chat(_LoopingTokenizer(), [{"role": "user", "content": "x"}], True)
        assert time.monotonic() - t0 < 5
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20 < remaining <= 30 and not fired
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
