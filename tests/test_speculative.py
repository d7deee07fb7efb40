"""Speculative decoding (`distill bench --draft`): acceptance counted exactly (against a hand count and against a
plain brute-force loop that runs the draft greedily from every step's prefix), greedy output with the draft
identical to the teacher's alone in transformers' assisted generation, and a bench that fails, never reports a
speed-up, when the outputs differ."""
import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distill.errors import DistillError
from distill.evaluate import acceptance as acc
from distill.evaluate import speculative as sp

sys.path.insert(0, str(Path(__file__).parent))
from conftest import GEN_ROWS, make_tiny_untied  # noqa: E402

MAX_NEW = 20


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: torch's thread pool spinning beside another job makes tiny decodes 10x slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory, smollm2_dir):
    """A tiny teacher and a draft that is the teacher with noise on its last layer: it agrees on most tokens,
    not all, so acceptance is partial and every branch of the count is taken."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("spec")
    teacher = make_tiny_untied(tmp / "teacher", smollm2_dir, layers=2, seed=0, head_std=1.0)
    draft = AutoModelForCausalLM.from_pretrained(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in draft.model.layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    draft.save_pretrained(tmp / "draft")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp / "draft")
    return teacher, str(tmp / "draft")


@pytest.fixture(scope="module")
def pair(pair_dirs):
    from distill.models.loading import load_tokenizer

    tok = load_tokenizer(pair_dirs[0])
    return sp.load_pair(pair_dirs[0], pair_dirs[1], tok), tok


@pytest.fixture(scope="module")
def prompts(pair):
    tok = pair[1]
    return [tok(r["prompt"], add_special_tokens=False).input_ids for r in GEN_ROWS[:4]]


def test_verification_steps_match_a_hand_count():
    # teacher tokens the draft gets right: 1 1 0 1 1 1 0; gamma 2:
    # step at 0 accepts 2 (+ bonus token 2), step at 3 accepts 2 (+ bonus 5), step at 6: one left, rejected
    match = [True, True, False, True, True, True, False]
    assert acc.verification_steps(match, 2) == [(2, 2), (2, 2), (0, 1)]
    s = acc.acceptance_stats([match], 2)
    assert s["acceptance_per_position"] == [2 / 3, 1.0] and s["reached_per_position"] == [3, 2]
    assert s["teacher_forwards"] == 3 and s["tokens_per_forward"] == 7 / 3 and s["mean_accepted"] == 4 / 3
    # gamma 1: steps at 0 (accepts token 0, bonus 1), 2 (rejected, the teacher's own token 2), 3 and 5
    assert acc.verification_steps(match, 1) == [(1, 1), (0, 1), (1, 1), (1, 1)]
    # all accepted to the end: the last step's proposals are capped by what is left, no bonus beyond it
    assert acc.verification_steps([True] * 5, 3) == [(3, 3), (1, 1)]


def _brute_greedy(model, ids: list[int], n: int, stops=()) -> list[int]:
    """Greedy tokens by full forward passes, no KV cache: the plainest decoding there is."""
    import torch

    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stops:
            break
    return out


def _brute_stats(teacher, draft, prompts, gamma, stops):
    """Speculative decoding simulated step by step: the teacher's greedy output, then at each step the draft
    decodes gamma tokens greedily from prompt + output so far; accepted = leading proposals equal to the
    teacher's next tokens; the step advances by accepted + 1."""
    per_step = []  # (accepted, proposals that could be checked: at most what was left)
    outputs, tokens = [], 0
    for p in prompts:
        out = _brute_greedy(teacher, p, MAX_NEW, set(stops))
        outputs.append(out)
        tokens += len(out)
        i = 0
        while i < len(out):
            proposal = _brute_greedy(draft, p + out[:i], gamma)
            left = out[i:i + gamma]
            a = 0
            while a < len(left) and proposal[a] == left[a]:
                a += 1
            per_step.append((a, len(left)))
            i += a + 1
    reached = [sum(1 for a, cap in per_step if a >= j and j < cap) for j in range(gamma)]
    accepted = [sum(1 for a, _ in per_step if a > j) for j in range(gamma)]
    return outputs, {"acceptance_per_position": [x / r if r else None for x, r in zip(accepted, reached)],
                     "teacher_forwards": len(per_step), "tokens_per_forward": tokens / len(per_step),
                     "mean_accepted": sum(a for a, _ in per_step) / len(per_step)}


def test_acceptance_equals_a_brute_force_count(pair, prompts):
    p, _ = pair
    result = sp.acceptance(p.teacher, p.draft, prompts, [1, 2, 3, 5], MAX_NEW, p.stop_ids, p.vocab)
    for gamma in (1, 2, 3, 5):
        outputs, expected = _brute_stats(p.teacher, p.draft, prompts, gamma, p.stop_ids)
        assert result["outputs"] == outputs  # the KV-cache decode is the plain one
        got = result["by_gamma"][gamma]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), (gamma, key)
    # the pair is a real test: some proposals accepted, some not
    assert 0 < result["by_gamma"][3]["mean_accepted"] < 3


def test_a_draft_equal_to_the_teacher_is_always_accepted(pair, prompts):
    p, _ = pair
    for gamma in (1, 4):
        result = sp.acceptance(p.teacher, p.teacher, prompts, gamma, MAX_NEW, p.stop_ids, p.vocab)
        s = result["by_gamma"][gamma]
        assert all(a == 1.0 for a in s["acceptance_per_position"] if a is not None)
        # gamma + 1 tokens per teacher forward, but for each response's last step (what was left)
        lengths = [len(o) for o in result["outputs"]]
        assert s["teacher_forwards"] == sum(-(-n // (gamma + 1)) for n in lengths)


def test_assisted_generation_gives_the_teachers_greedy_output(pair, prompts):
    p, _ = pair
    alone, _ = sp.timed_decode(p.teacher, prompts, MAX_NEW, p.stop_ids, p.vocab)
    for gamma in (1, 3):
        assisted, _ = sp.timed_decode(p.teacher, prompts, MAX_NEW, p.stop_ids, p.vocab, p.draft, gamma)
        assert assisted == alone
    report = sp.speculative_figures(p, prompts, MAX_NEW, gammas=(1, 2))
    assert report["best_gamma"] in (1, 2) and all(r["outputs_identical"] for r in report["gammas"])
    assert report["draft_size"]["layers"] == 2 and report["alone"]["tokens_per_s"] > 0


def test_the_bench_fails_when_outputs_differ(pair, prompts, monkeypatch):
    # A mock, because a real draft cannot change a correct greedy verifier's output: this stands for a broken
    # runtime (or a wrongly wired assistant) whose assisted decode returns another sequence for one prompt.
    p, _ = pair
    real = sp.greedy_one

    def broken(model, prompt, *args, **kwargs):
        out = real(model, prompt, *args, **kwargs)
        draft = args[3] if len(args) > 3 else kwargs.get("draft")
        return out[:-1] + [out[-1] + 1] if draft is not None and prompt == prompts[1] else out

    monkeypatch.setattr(sp, "greedy_one", broken)
    with pytest.raises(DistillError, match="changed the greedy output of prompt 1"):
        sp.speculative_figures(p, prompts, MAX_NEW, gammas=(2,))


def test_bench_draft_through_the_cli(pair_dirs, tmp_path):
    from distill.cli import cli

    teacher, draft = pair_dirs
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    recipe = {"name": "spec", "workdir": str(tmp_path / "w"), "teacher": teacher,
              "task": {"type": "generation", "data": str(tmp_path / "d.jsonl"), "max_length": 64,
                       "split": {"validation": 0.2, "holdout": 0.3}},
              "generate": {"max_new_tokens": 8}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", str(tmp_path / "r.yaml"), "--teacher", teacher, "--draft", draft,
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "bench.json").read_text())
    assert report["task"] == "speculative" and report["n"] == 3
    assert [r["gamma"] for r in report["gammas"]] == list(acc.GAMMAS) and report["best_gamma"] in acc.GAMMAS
    assert (out / "bench.png").stat().st_size > 0 and "(best)" in res.output
    both = CliRunner().invoke(cli, ["bench", str(tmp_path / "r.yaml"), "--teacher", teacher, "--draft", draft,
                                    "--student", draft])
    assert both.exit_code == 2 and "one of the two" in both.output
    some = CliRunner().invoke(cli, ["bench", str(tmp_path / "r.yaml"), "--teacher", teacher, "--draft", draft,
                                    "--gammas", "3,1", "--out", str(tmp_path / "some")])
    assert some.exit_code == 0, some.output
    some_report = json.loads((tmp_path / "some" / "bench.json").read_text())
    assert [r["gamma"] for r in some_report["gammas"]] == [1, 3]  # timed: these; counted: every GAMMAS too
    assert sorted(map(int, some_report["acceptance"])) == list(acc.GAMMAS) and "8 (not timed)" in some.output
    bad = CliRunner().invoke(cli, ["bench", str(tmp_path / "r.yaml"), "--teacher", teacher, "--draft", draft,
                                   "--gammas", "2,x"])
    assert bad.exit_code == 2 and "--gammas" in bad.output


# ---------------------------------------------------------------- llama.cpp (two .gguf files)

@pytest.fixture(scope="module")
def gguf_pair(pair_dirs, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from distill.export.pipeline import export_gguf

    tmp = tmp_path_factory.mktemp("spec-gguf")
    paths = []
    for src, name in zip(pair_dirs, ("teacher.gguf", "draft.gguf")):
        export_gguf(src, tmp / name, "f16", verify=False)
        paths.append(str(tmp / name))
    return paths


def _gguf_brute_stats(teacher, draft, prompts, gamma, stops):
    """_brute_stats through llama.cpp: the draft decodes gamma greedy tokens afresh from every step's prefix."""
    from distill.evaluate import speculative_gguf as sg

    t, d = sg.load(teacher, 256), sg.load(draft, 256)
    matches = []
    for p in prompts:
        out = sg.greedy(t, p, MAX_NEW, set(stops))
        i, match = 0, [False] * len(out)
        while i < len(out):
            d.reset()
            proposal = sg.greedy(d, p + out[:i], gamma, set())
            a = 0
            while a < min(gamma, len(out) - i) and proposal[a] == out[i + a]:
                match[i + a] = True
                a += 1
            i += a + 1
        matches.append((out, match))
    return matches


def test_llama_cpp_speculative_decoding_gives_the_teachers_output(gguf_pair, pair, prompts):
    from distill.evaluate import speculative_gguf as sg

    p, _ = pair
    report = sg.gguf_figures(gguf_pair[0], gguf_pair[1], prompts, MAX_NEW, p.stop_ids, [1, 3], threads=1)
    assert report["runtime"] == "llama.cpp" and all(r["outputs_identical"] for r in report["gammas"])
    assert report["draft_size"]["layers"] == 2 and report["draft_size"]["parameters"] > 0
    brute = _gguf_brute_stats(gguf_pair[0], gguf_pair[1], prompts, 3, p.stop_ids)
    assert report["outputs"] == [out for out, _ in brute]
    # the brute count marks only the proposals it reached; the bench's counts from one pass agree on those steps
    expected = acc.acceptance_stats([m for _, m in brute], 3)
    got = next(r for r in report["gammas"] if r["gamma"] == 3)
    for key in ("teacher_forwards", "mean_accepted", "tokens_per_forward"):
        assert got[key] == pytest.approx(expected[key]), key
    assert 0 < got["mean_accepted"] < 3

