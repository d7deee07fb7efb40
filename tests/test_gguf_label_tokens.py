"""Label tokens through GGUF export and llama.cpp scoring (issue 13).

A label-token student exported to GGUF keeps its label tokens as USER_DEFINED tokens, so llama.cpp
tokenizes the label names to them and prints them, while the model's control tokens stay CONTROL;
GGUFScorer (distill eval / bench of a .gguf) reads such a model at one position per text and agrees
with the transformers model; a trained student's greedy llama.cpp answer is the label name; and a
model without label tokens is scored over the answers' prefix tree through the KV cache, with the
scores of one evaluation per label.

The tiny model's weights are rounded to float16 values before export, so the f16 GGUF holds exactly
the transformers weights and what differs is llama.cpp's f16 arithmetic. Measured on the default
task's 256 holdout texts: label log-probabilities within 0.0121 of transformers', the top-2 margin
within 0.0154; all 256 predictions the same (6 of the 8 labels predicted), 2 texts nearer a tie than
NEAR_TIE, the closest 0.0097 apart.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_llama, write_class_data, write_recipe

from distill.models.llamacpp import have_llama_cpp, passive_openmp

passive_openmp()  # before llama.cpp (or torch) loads libgomp, when this module is imported first

import torch  # noqa: E402

from distill.config import load_recipe  # noqa: E402
from distill.data.builtin_task import LABELS  # noqa: E402
from distill.data.prompts import encode_classification, end_of_turn_id, label_answers, prompt_ids  # noqa: E402
from distill.export.pipeline import export_gguf  # noqa: E402
from distill.models.label_tokens import add_label_tokens, label_token_ids  # noqa: E402

needs_llama = pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed "
                                 "(pip install 'distill[llama]'): llama.cpp checks skipped")
pytestmark = needs_llama
ROOT = Path(__file__).resolve().parents[1]
PAD_ROWS = 8
NEAR_TIE = 0.03  # transformers' top-2 margin under which f16 arithmetic may pick either label (2x the error)


@pytest.fixture(scope="module")
def default_holdout(tmp_path_factory):
    """(recipe, labels, holdout examples) of the built-in default task."""
    from distill.data.splits import prepare_splits

    recipe = load_recipe(str(ROOT / "recipes" / "default.yaml"))
    splits = prepare_splits(recipe.task, tmp_path_factory.mktemp("work"), "recipes/default.yaml", with_holdout=True)
    assert splits.labels == LABELS and len(splits.holdout) == 256
    return recipe, splits.labels, splits.holdout


def _f16_exact(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


@pytest.fixture(scope="module")
def label_token_gguf(tmp_path_factory, smollm2_dir):
    """(model dir, GGUF alone in its own directory, label token ids): a tiny random llama with the
    default task's label tokens and padding rows after them. Attention values and outputs are larger
    than the default init, so the prediction depends on the text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lt")
    base = make_tiny_llama(root / "base", smollm2_dir, layers=2, extra_rows=PAD_ROWS, seed=3)
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("v_proj.weight", "o_proj.weight")):
                p.normal_(0, 1.0)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.1)
    ids = add_label_tokens(model, tok, LABELS)
    _f16_exact(model)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "gguf").mkdir()
    out = root / "gguf" / "model.gguf"
    export_gguf(root / "model", out, "f16", verify=False)
    return root / "model", out, ids


def test_label_tokens_are_user_defined_and_control_tokens_stay_control(label_token_gguf):
    import gguf
    from transformers import AutoTokenizer

    model_dir, out, ids = label_token_gguf
    tok = AutoTokenizer.from_pretrained(model_dir)
    r = gguf.GGUFReader(str(out))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 49152 + PAD_ROWS  # one per embedding row: the 3 new label tokens took padding rows
    assert [tokens[i] for i in ids] == LABELS
    assert {types[i] for i in ids} == {int(gguf.TokenType.USER_DEFINED)}
    for control in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<jupyter_code>"):
        assert types[tok.convert_tokens_to_ids(control)] == int(gguf.TokenType.CONTROL), control
    assert set(types[len(tok):]) == {int(gguf.TokenType.UNUSED)}  # padding rows
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"  # added tokens do not hide the family


def test_llama_cpp_tokenizes_and_prints_the_label_tokens(label_token_gguf):
    from transformers import AutoTokenizer

    from distill.models.llamacpp import GGUFScorer

    model_dir, out, ids = label_token_gguf
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = GGUFScorer(str(out), tokenizer_dir=str(model_dir)).llm
    for lab, i in zip(LABELS, ids):
        hf_ids = tok(lab, add_special_tokens=False).input_ids
        assert llm.tokenize(lab.encode(), add_bos=False, special=True) == hf_ids == [i]
        assert llm.detokenize([i]) == lab.encode()  # printed without special=True, as llama-server prints
    text = "my billing, then a refund.praise"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids
    assert llm.detokenize([end_of_turn_id(tok)]) == b""  # a control token is not printed


def test_gguf_predicts_the_labels_transformers_predicts(label_token_gguf, default_holdout):
    """Every holdout text of the default task, scored at one position: the embedded tokenizer gives
    transformers' prompts and label tokens, and the predictions agree (but on near ties)."""
    from distill.evaluate.evaluation import HFScorer
    from distill.models.llamacpp import GGUFScorer

    model_dir, out, ids = label_token_gguf
    recipe, labels, holdout = default_holdout
    hf, gg = HFScorer(str(model_dir)), GGUFScorer(str(out))  # the GGUF alone: its embedded tokenizer
    enc, answers = encode_classification(hf.tokenizer, recipe.task, labels, holdout, recipe.task.max_length)
    enc_gg, answers_gg = encode_classification(gg.tokenizer, recipe.task, labels, holdout, recipe.task.max_length)
    assert answers == answers_gg == [[i] for i in ids]
    assert [e.prompt for e in enc] == [e.prompt for e in enc_gg]  # "refund" in 26 texts: still text
    assert sum("refund" in ex["text"] for ex in holdout) > 0
    ref, got = hf.scores(enc, answers), gg.scores(enc, answers)
    assert (ref - got).abs().max() < 0.05
    top2 = ref.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < NEAR_TIE
    assert near_tie.sum() <= 4
    agree = ref.argmax(1) == got.argmax(1)
    assert agree[~near_tie].all(), f"predictions differ on texts {(~agree).nonzero().flatten().tolist()}"
    assert len(set(ref.argmax(1).tolist())) >= 4  # the prediction depends on the text


def test_prefix_tree_scores_equal_one_eval_per_label(tmp_path, smollm2_dir, default_holdout, monkeypatch):
    """A model without label tokens: answers with shared prefixes, one answer a prefix of another, a
    one-token answer, the default task's own answers. The prefix-tree walk through the KV cache (and
    the prompt prefix kept from the text before) gives the scores of the way distill scored before:
    a fresh cache per text, the prompt evaluated, then each label evaluated after it."""
    from transformers import AutoTokenizer

    from distill.models.llamacpp import GGUFScorer, KVSequence
    from distill.models.scoring import trie_layout

    recipe, labels, holdout = default_holdout
    path = make_tiny_llama(tmp_path / "m", smollm2_dir, layers=2, seed=5)
    out = tmp_path / "m.gguf"
    export_gguf(path, out, "f16", verify=False)
    tok = AutoTokenizer.from_pretrained(path)
    assert label_token_ids(tok, labels) is None
    a, b, c, d, e = (tok.get_vocab()[t] for t in ("bill", "ing", "Ġcard", "Ġfee", "Ġnow"))
    crafted = [[a, b, c, 2], [a, b, d, 2], [a, b], [a, b, c], [a, e, d, c, 2], [e], [b, a, 2]]
    answers = label_answers(tok, recipe.task, labels) + crafted
    assert max(map(len, answers)) > 2
    enc, _ = encode_classification(tok, recipe.task, labels, holdout[:6], recipe.task.max_length)

    fed = {False: 0, True: 0}  # tokens fed: of prompts (one logits row), of answers (every row)
    feed = KVSequence.feed

    def counted(self, tokens, every):
        fed[every] += len(tokens)
        return feed(self, tokens, every)

    monkeypatch.setattr(KVSequence, "feed", counted)
    got = GGUFScorer(str(out), tokenizer_dir=path).scores(enc, answers)
    assert fed[True] == len(enc) * len(trie_layout(answers).fed_tokens)  # each inner node of the tree once
    assert fed[False] < sum(len(x.prompt) for x in enc)  # the system prompt kept from the text before
    assert (got - one_eval_per_label(out, enc, answers)).abs().max() < 1e-4


def one_eval_per_label(path, enc, answers) -> torch.Tensor:
    """GGUFScorer's scores before the prefix tree: each label's answer evaluated after the prompt."""
    import numpy as np

    from distill.models.llamacpp import load_gguf

    llm = load_gguf(path, 512, seed=0)
    rows = []
    for e in enc:
        llm.reset()
        llm.eval(e.prompt)
        P, row = len(e.prompt), []
        for lab in answers:
            llm.n_tokens = P
            if len(lab) > 1:
                llm.eval(lab[:-1])
            logits = np.array(llm.scores[P - 1: P - 1 + len(lab)], dtype=np.float64)
            m = logits.max(1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
            row.append(sum(logp[t, tok] for t, tok in enumerate(lab)))
        rows.append(row)
    llm.close()
    return torch.tensor(rows, dtype=torch.float32)


def test_trained_student_answers_the_label_name_in_llama_cpp(tmp_path, smollm2_dir):
    """distill train's label-token student, exported: llama.cpp's greedy completion of a training
    prompt prints exactly the gold label's name, then ends the turn."""
    from transformers import AutoTokenizer

    from distill.data.sampling import subset_indices
    from distill.models.llamacpp import GGUFScorer
    from distill.train import run_train

    model = make_tiny_llama(tmp_path / "m", smollm2_dir, layers=2, seed=1)
    data = write_class_data(tmp_path / "d.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", model, alpha=0.0, epochs=40, lr=3e-3,
                          batch_size=2, train_examples=2, eval_examples=4, warmup_ratio=0.0)
    student = run_train(load_recipe(recipe))
    out = tmp_path / "student.gguf"
    export_gguf(student, out, "f16", verify=False)
    r, tok = load_recipe(recipe), AutoTokenizer.from_pretrained(student)
    llm = GGUFScorer(str(out)).llm
    train = [json.loads(x) for x in (tmp_path / "w" / "data" / "train.jsonl").read_text().splitlines()]
    for ex in [train[i] for i in subset_indices(train, 2, seed=0)]:
        prompt = prompt_ids(tok, r.task, r.task.labels, ex["text"])
        llm.reset()
        done = llm.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]
        assert (done["text"], done["finish_reason"]) == (ex["label"], "stop")  # stopped by the end of turn
