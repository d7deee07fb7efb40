"""A hostile teacher server on 127.0.0.1: http.server in a thread speaking just enough of vLLM's API for
distill's server backend (`/v1/models`, `/tokenize`, `/v1/completions` with `echo` + `prompt_logprobs`,
`/health`), whose work answers are broken one way per case: NaN, inf, positive log-probabilities, ids
outside the vocabulary, strings for numbers, too few prompt positions, answers that stop mid-body or
never come. For each, the real CLI (`distill generate`, in-process) must exit 1 with one error line and
no traceback, cache nothing from the bad answer, leave every file that existed before byte for byte as
it was, end within its (short) timeout, and write the URL's credentials into no file. A manifest-tamper
table checks a finished cache's manifest is refused when edited (k, a JSON string, a shard without its
checksum, a shard name that climbs out of the cache). And doctor, a read-only command, writes nothing
and calls no truncated student weights ok."""
from __future__ import annotations

import http.server
import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import GEN_ROWS
from test_bad_input import error_lines, snapshot

from distill.cli import cli

TIMEOUT = 2  # DISTILL_TEACHER_TIMEOUT for every case: a hang must end the run in about this
PASSWORD = "s3cr3t-pw"
API_KEY = "sk-hostile-test-key"
MODEL_ID = "tiny-teacher"


class Hostile:
    """The server. `mode` breaks the answers to work requests (`echo` completions); `good_first` work
    requests are answered well before it does. Start-up probes are always answered well."""

    def __init__(self, tok):
        self.tok, self.mode, self.good_first, self.work = tok, "good", 0, 0
        self.released = threading.Event()  # set at the end: hanging handlers return
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802 - the http.server interface
                outer.handle(self, None)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                outer.handle(self, body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, credentials: bool = True) -> str:
        auth = f"user:{PASSWORD}@" if credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}/v1"

    def close(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- answers --------------------------------------------------------------------------------
    def handle(self, h, body):
        import base64

        basic = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
        if h.headers.get("Authorization") not in (basic, f"Bearer {API_KEY}"):
            return self.send(h, 401, {"error": {"message": "Unauthorized"}})
        if h.path == "/health":
            return self.send(h, 200, {})
        if h.path == "/v1/models":
            return self.send(h, 200, {"object": "list", "data": [{"id": MODEL_ID, "root": MODEL_ID}]})
        if h.path == "/tokenize":
            text = body.get("prompt")
            if text is None:
                text = self.tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            return self.send(h, 200, {"tokens": self.tok(text, add_special_tokens=False).input_ids,
                                      "max_model_len": 2048})
        if h.path == "/v1/completions" and not body.get("echo"):  # the max_logprobs probe
            return self.send(h, 200, {"choices": [{"index": 0, "text": ""}]})
        with self.lock:
            self.work += 1
            mode = "good" if self.work <= self.good_first else self.mode
        return self.work_answer(h, body, mode)

    def send(self, h, code, obj, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(obj).encode()  # json.dumps writes NaN, Infinity as such
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def work_answer(self, h, body, mode):
        if mode == "never_answers":
            self.released.wait(60)
            return
        n = int(body["prompt_logprobs"])
        choices = [{"index": i, "text": "", "prompt_logprobs": positions(seq, n, mode)}
                   for i, seq in enumerate(body["prompt"])]
        data = json.dumps({"id": "cmpl-1", "choices": choices}).encode()
        if mode == "trickle":  # a byte every 0.2 s: each read returns, only a deadline for the whole ends it
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            for byte in data:
                if self.released.wait(0.2):
                    return
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
            return
        if mode == "hang_mid_body":  # the headers and half the body, then nothing
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            self.released.wait(60)
            return
        raw = {"not_json": b"<html>busy</html>", "json_list": b"[1, 2, 3]",
               "no_choices": b'{"id": "cmpl-1"}'}.get(mode)
        return self.send(h, 200, None, raw=raw if raw is not None else data)


BROKEN = {  # mode -> what one entry of the answer becomes
    "nan": lambda e: {**e, "logprob": float("nan")},
    "inf": lambda e: {**e, "logprob": float("inf")},
    "minus_inf": lambda e: {**e, "logprob": float("-inf")},
    "positive": lambda e: {**e, "logprob": 0.7},
    "string_logprob": lambda e: {**e, "logprob": "-0.5"},
    "bool_logprob": lambda e: {**e, "logprob": True},
    "string_rank": lambda e: {**e, "rank": "1"},
}


def positions(seq, n, mode):
    """prompt_logprobs for one sequence: None, then per position the n best (ids 1..n) and the actual
    token, each {"logprob", "rank", "decoded_token"}; broken as `mode` says."""
    out = [None]
    for t in range(1, len(seq)):
        entry = {str(i + 1): {"logprob": -1.0 - 0.25 * i, "rank": i + 1, "decoded_token": "x"} for i in range(n)}
        entry.setdefault(str(seq[t]), {"logprob": -6.0, "rank": 500, "decoded_token": "y"})
        out.append(entry)
    last = out[-1]
    first = next(iter(last))
    if mode in BROKEN:
        last[first] = BROKEN[mode](last[first])
    elif mode == "id_out_of_range":
        last["999999"] = {"logprob": -3.0, "rank": 2}
    elif mode == "negative_id":
        last["-3"] = {"logprob": -3.0, "rank": 2}
    elif mode == "too_few_positions":
        out = out[:-1]
    elif mode == "null_position":
        out[-1] = None
    elif mode == "entry_not_object":
        last[first] = -0.5
    return out


def tiny_tokenizer(out: Path) -> str:
    """A 320-token byte-level BPE tokenizer and a config naming its size: all the teacher a served run
    needs locally, and quick to load (the cases run the CLI many times)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([r["prompt"] + " " + r["response"] for r in GEN_ROWS], trainer)
    end = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=end, eos_token=end, pad_token=end)
    tok.save_pretrained(out)
    LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("hostile")
    tok_dir = tiny_tokenizer(tmp / "tokenizer")
    server = Hostile(AutoTokenizer.from_pretrained(tok_dir))
    data = tmp / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    spec = tmp / "teacher.yaml"  # the user's own file holds the URL with its password: distill must copy it nowhere
    spec.write_text(yaml.safe_dump({"name": MODEL_ID, "source": tok_dir, "url": server.url(), "backend": "server"}))
    try:
        yield {"tmp": tmp, "server": server, "data": data, "spec": spec, "tok_dir": tok_dir}
    finally:
        server.close()


def recipe(env, name: str, teacher=None) -> Path:
    r = {"workdir": str(env["tmp"] / f"w-{name}"), "teacher": str(teacher or env["spec"]),
         "task": {"type": "generation", "data": str(env["data"]), "split": {"validation": 0.2, "holdout": 0.2},
                  "max_length": 64},
         "generate": {"k": 4, "batch_size": 2, "shard_size": 2}}
    p = env["tmp"] / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def run_cli(args, monkeypatch) -> tuple[object, float]:
    monkeypatch.setenv("DISTILL_TEACHER_TIMEOUT", str(TIMEOUT))
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res, time.monotonic() - t0


def leaked(root: Path, output: str) -> list[str]:
    """Files under `root` (and the CLI's output) that hold the URL's password or the API key."""
    hits = [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and (PASSWORD.encode() in p.read_bytes() or API_KEY.encode() in p.read_bytes())]
    return hits + (["the command's output"] if PASSWORD in output or API_KEY in output else [])


def failure_problems(res, took, expected, before, after, within) -> list[str]:
    """What is wrong with a run that must fail: exit 1, one error line naming `expected`, no traceback,
    every earlier file unchanged, within `within` seconds."""
    lines = error_lines(res.output)
    problems = []
    if res.exit_code != 1:
        problems.append(f"exit {res.exit_code}, expected 1")
    if len(lines) != 1 or expected not in lines[0]:
        problems.append(f"error lines {lines}, expected one naming {expected!r}")
    if "Traceback" in res.output or not isinstance(res.exception, (SystemExit, type(None))):
        problems.append(f"raised {type(res.exception).__name__}: {res.exception}")
    if took > within:
        problems.append(f"took {took:.1f} s, expected under {within} s")
    changed = [p for p, sig in before.items() if after.get(p) != sig]
    if changed:
        problems.append(f"changed or removed {changed[:3]}")
    return problems


# mode -> what its one error line must say
CASES = {
    "nan": "log-probability nan is not finite",
    "inf": "log-probability inf is not finite",
    "minus_inf": "log-probability -inf is not finite",
    "positive": "log-probability 0.7 is above 0",
    "string_logprob": "log-probability '-0.5' is not a number",
    "bool_logprob": "log-probability 'True' is not a number",
    "string_rank": "rank '1' is not an integer",
    "id_out_of_range": "token id 999999 is outside the vocabulary",
    "negative_id": "token id -3 is outside the vocabulary",
    "too_few_positions": "prompt positions for a prompt of",
    "null_position": "no log-probabilities at a position asked for",
    "entry_not_object": "expected an object with a logprob",
    "not_json": "not a JSON answer",
    "json_list": "expected a JSON object, got list",
    "no_choices": "asked for 2 completions, got 0",
    "hang_mid_body": f"no complete answer within {TIMEOUT} s",
    "never_answers": f"no complete answer within {TIMEOUT} s",
    "trickle": f"no complete answer within {TIMEOUT} s",
}


def test_hostile_answers_are_refused_and_nothing_of_them_is_cached(hostile, monkeypatch):
    env, server = hostile, hostile["server"]
    assert len(CASES) >= 15
    failures = []
    for mode, expected in CASES.items():
        server.mode, server.good_first, server.work = mode, 0, 0
        r = recipe(env, mode)
        before = snapshot(env["data"], env["spec"], env["tok_dir"], r)
        res, took = run_cli(["generate", r], monkeypatch)
        cache = env["tmp"] / f"w-{mode}" / "cache"
        problems = failure_problems(res, took, expected, before, snapshot(env["data"], env["spec"], env["tok_dir"], r),
                                    within=TIMEOUT + 12)
        if server.work < 1:
            problems.append("the broken answer was never asked for")
        if list(cache.glob("*.safetensors")) or json.loads((cache / "manifest.json").read_text())["shards"]:
            problems.append("a shard was cached")
        problems += [f"credentials in {p}" for p in leaked(env["tmp"] / f"w-{mode}", res.output)]
        if problems:
            failures.append(f"{mode}: {'; '.join(problems)}\n    output: {res.output.strip()[-400:]}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases failed:\n" + "\n".join(failures)


def test_a_hang_after_some_shards_keeps_them_and_the_same_command_resumes(hostile, monkeypatch):
    """Two shards answered, then the server hangs: the run ends within the timeout with the two shards
    cached; once the server answers again, the same command requests only the missing shards."""
    env, server = hostile, hostile["server"]
    server.mode, server.good_first, server.work = "hang_mid_body", 2, 0
    r = recipe(env, "resume")
    res, took = run_cli(["generate", r], monkeypatch)
    assert res.exit_code == 1 and took < TIMEOUT + 12, res.output
    assert len(error_lines(res.output)) == 1 and "no complete answer" in res.output
    cache = env["tmp"] / "w-resume" / "cache"
    first = json.loads((cache / "manifest.json").read_text())
    assert [s["number"] for s in first["shards"]] == [0, 1] and not first["complete"]
    server.mode, server.work = "good", 0
    res, _ = run_cli(["generate", r], monkeypatch)
    assert res.exit_code == 0, res.output
    done = json.loads((cache / "manifest.json").read_text())
    assert done["complete"] == {"train": True, "validation": True}
    assert server.work == len(done["shards"]) - 2  # only the missing shards were asked for
    assert done["shards"][:2] == first["shards"]  # the two from before the hang, untouched
    assert not leaked(env["tmp"] / "w-resume", res.output)


def test_api_key_goes_as_bearer_and_no_secret_is_written(hostile, monkeypatch, tmp_path):
    """A URL without credentials: refused (HTTP 401) without a key; with DISTILL_TEACHER_API_KEY the
    same run succeeds. A teacher given only as a URL with credentials is stored in the manifest
    without them, and neither the password nor the key reaches any file distill wrote."""
    env, server = hostile, hostile["server"]
    server.mode = "good"
    spec = tmp_path / "keyed.yaml"
    spec.write_text(yaml.safe_dump({"name": MODEL_ID, "tokenizer": env["tok_dir"], "url": server.url(False),
                                    "backend": "server"}))
    monkeypatch.delenv("DISTILL_TEACHER_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    r = recipe(env, "keyless", teacher=spec)
    res, _ = run_cli(["generate", r], monkeypatch)
    assert res.exit_code == 1 and "HTTP 401" in error_lines(res.output)[0], res.output
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", API_KEY)
    res, _ = run_cli(["generate", r], monkeypatch)
    assert res.exit_code == 0, res.output
    # the URL with credentials as the teacher itself (no source: the spec's tokenizer) and as --teacher-url
    monkeypatch.delenv("DISTILL_TEACHER_API_KEY")
    spec.write_text(yaml.safe_dump({"name": MODEL_ID, "tokenizer": env["tok_dir"], "url": server.url(),
                                    "backend": "server"}))
    r = recipe(env, "with-password", teacher=spec)
    res, _ = run_cli(["generate", r, "--teacher-url", server.url()], monkeypatch)
    assert res.exit_code == 0, res.output
    manifest = json.loads((env["tmp"] / "w-with-password" / "cache" / "manifest.json").read_text())
    assert manifest["teacher"] == server.url(False)[: -len("/v1")]
    assert not leaked(env["tmp"] / "w-with-password", res.output) and not leaked(env["tmp"] / "w-keyless", "")
    # doctor shows the url without the password too
    res = CliRunner().invoke(cli, ["doctor", "--no-estimate", "--teacher", str(spec)])
    assert f"127.0.0.1:{server.port}" in res.output and PASSWORD not in res.output, res.output


def test_errors_and_manifests_redact_credentials():
    from distill.errors import DistillError, describe, redact

    assert redact("see http://u:p%40ss@h:1/v1 and https://tok@x.org/a") == "see http://h:1/v1 and https://x.org/a"
    assert describe(DistillError("http://user:pw@127.0.0.1:9: refused"))[1] == "http://127.0.0.1:9: refused"
    code, line = describe(ValueError("bad http://a:b@c/d"))
    assert "a:b@" not in line and "http://c/d" in line


@pytest.fixture(scope="module")
def finished(hostile, tmp_path_factory):
    """A complete top-k cache from the well-behaved server, for the tamper table to copy."""
    env, server = hostile, hostile["server"]
    server.mode = "good"
    mp = pytest.MonkeyPatch()
    try:
        res, _ = run_cli(["generate", recipe(env, "finished")], mp)
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return env["tmp"] / "w-finished" / "cache"


def tampered(manifest: dict) -> dict:
    first = dict(manifest["shards"][0])
    no_sum = {k: v for k, v in first.items() if k != "sha256"}
    with_file = lambda name: {**manifest, "shards": [{**first, "file": name}] + manifest["shards"][1:]}  # noqa: E731
    return {
        "k edited by hand": ({**manifest, "k": 8}, "k is 8, but shard train-00000.safetensors holds 4"),
        "a manifest that is a JSON string": ("just a string", "expected a JSON object, got a str"),
        "a shard entry without a checksum": ({**manifest, "shards": [no_sum] + manifest["shards"][1:]},
                                             "shards[0].sha256: missing"),
        "a shard name that climbs out": (with_file("../../x.safetensors"), "expected a shard file name inside"),
        "an absolute shard path": (with_file("/etc/passwd"), "expected a shard file name inside"),
        "a checksum that is not hex": ({**manifest, "shards": [{**first, "sha256": "zz"}]}, "expected a SHA-256"),
        "an unknown kind": ({**manifest, "kind": "pickle"}, "kind: expected soft_labels or topk"),
        "shards that are not a list": ({**manifest, "shards": {"a": 1}}, "shards: expected a list"),
        "a shard entry that is a string": ({**manifest, "shards": ["train-00000.safetensors"]}, "expected an object"),
        "a count that is text": ({**manifest, "shards": [{**first, "count": "2"}]},
                                 "shards[0].count: expected an integer"),
    }


def test_a_tampered_manifest_is_refused_in_one_line(hostile, finished, monkeypatch):
    env = hostile
    manifest = json.loads((finished / "manifest.json").read_text())
    table = tampered(manifest)
    failures = []
    for i, (name, (content, expected)) in enumerate(table.items()):
        cache = env["tmp"] / f"tampered-{i}"
        shutil.copytree(finished, cache)
        (cache / "manifest.json").write_text(json.dumps(content))
        r = recipe(env, "finished")
        for args in (["generate", r, "--out", cache], ["doctor", "--no-estimate", "--cache", cache]):
            before = snapshot(cache, env["data"], env["spec"])
            res, took = run_cli(args, monkeypatch)
            problems = failure_problems(res, took, expected, before, snapshot(cache, env["data"], env["spec"]), 30)
            if problems:
                failures.append(f"{name} ({args[0]}): {'; '.join(problems)}\n    output: {res.output.strip()[-300:]}")
    assert not failures, f"{len(failures)} of {2 * len(table)} cases failed:\n" + "\n".join(failures)


NEVER_HEALTHY = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); " \
                "s.listen(); time.sleep(120)"  # accepts connections (the backlog), never answers one


def test_a_server_that_never_becomes_healthy_ends_start_up_within_its_timeout(tmp_path):
    from distill.config import TeacherSpec
    from distill.errors import DistillError
    from distill.teacher.launch import ServedTeacher

    class Silent(ServedTeacher):
        def command(self):
            return [sys.executable, "-c", NEVER_HEALTHY, str(self.port)]

    srv = Silent(TeacherSpec(name="x", source="x"), log_file=tmp_path / "log", start_timeout=2, stop_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(DistillError, match="not healthy after 2 s"):
        srv.start()
    assert time.monotonic() - t0 < 8
    assert srv.proc is None  # stopped, and its port free again
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", srv.port)) != 0


def test_a_request_that_times_out_moves_to_another_server(hostile):
    """Two servers, one never answering: every request it took times out there and is answered by the
    other; the numbers are the good server's."""
    from transformers import AutoTokenizer

    from distill.config import TeacherSpec
    from distill.teacher.remote import ServerTeacher

    tok = AutoTokenizer.from_pretrained(hostile["tok_dir"])
    silent, good = Hostile(tok), hostile["server"]
    try:
        silent.mode, good.mode, good.work, good.good_first = "never_answers", "good", 0, 0
        spec = TeacherSpec(name=MODEL_ID, source=hostile["tok_dir"], url=f"{silent.url()},{good.url()}")
        client = ServerTeacher(spec, tok, 4, model_path=hostile["tok_dir"], per_request=1, timeout=1.0)
        seqs = [tok("Name a colour. Blue is a colour.").input_ids] * 4
        t0 = time.monotonic()
        rows = client.topk(seqs, [list(range(1, len(s))) for s in seqs], 4)
        took = time.monotonic() - t0
        client.close()
    finally:
        silent.close()
    assert silent.work >= 1 and good.work == 4  # the silent server took some; each ended on the good one
    assert took < 6
    for ids, vals, _ in rows:
        assert ids[0].tolist() == [1, 2, 3, 4] and vals[0, 0].item() == -1.0


def test_serve_teacher_passes_the_api_key_through_the_environment(tmp_path, monkeypatch):
    """`vllm serve` reads VLLM_API_KEY for --api-key: the key goes there, never onto the command line."""
    import distill.teacher.launch as launch
    from distill.config import TeacherSpec

    seen = {}

    def popen(cmd, **kw):
        seen.update(cmd=cmd, env=kw["env"])
        raise RuntimeError("not starting anything")

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch.ServedTeacher, "command", lambda self: [sys.executable, "-c", "pass"])
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", API_KEY)
    with pytest.raises(RuntimeError, match="not starting"):
        launch.ServedTeacher(TeacherSpec(name="x", source=str(tmp_path))).start()
    assert seen["env"]["VLLM_API_KEY"] == API_KEY and API_KEY not in " ".join(seen["cmd"])


# -- doctor: read-only, and a student's weights checked as loading them would ---------------------------


def test_doctor_writes_nothing_and_refuses_a_truncated_student(hostile, finished, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    env = hostile
    env["server"].mode = "good"
    r = recipe(env, "doctor-only")
    workdir = env["tmp"] / "w-doctor-only"
    before = snapshot(env["tmp"])
    res = CliRunner().invoke(cli, ["doctor", "--no-estimate", "--recipe", str(r), "--json"])
    checks = {c["check"]: c for c in json.loads(res.output[res.output.index("[\n"):])}
    assert checks["data"]["status"] == "ok" and checks["teacher"]["status"] == "ok", checks
    assert not workdir.exists() and snapshot(env["tmp"]) == before  # no split files, nothing at all
    student = tmp_path / "student"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(student)
    AutoTokenizer.from_pretrained(env["tok_dir"]).save_pretrained(student)
    res = CliRunner().invoke(cli, ["doctor", "--no-estimate", "--cache", str(finished), "--student", str(student)])
    assert res.exit_code == 0 and "ok  student" in res.output, res.output
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = CliRunner().invoke(cli, ["doctor", "--no-estimate", "--cache", str(finished), "--student", str(student)])
    lines = error_lines(res.output)
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "student" in lines[0] and "model.safetensors: unreadable weights" in lines[0]


def test_the_timeout_is_configurable_and_checked(monkeypatch):
    from types import SimpleNamespace

    from distill.errors import UsageError
    from distill.teacher.common import DEFAULT_TIMEOUT, request_timeout, split_credentials

    monkeypatch.delenv("DISTILL_TEACHER_TIMEOUT", raising=False)
    assert request_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv("DISTILL_TEACHER_TIMEOUT", "7.5")
    assert request_timeout() == 7.5 and request_timeout(SimpleNamespace(timeout=3)) == 3.0  # a spec's own wins
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv("DISTILL_TEACHER_TIMEOUT", bad)
        with pytest.raises(UsageError, match="DISTILL_TEACHER_TIMEOUT"):
            request_timeout()
    assert split_credentials("http://u%40x:p%2Fw@h:8000") == ("http://h:8000", ("u@x", "p/w"))
    assert split_credentials("http://h:8000") == ("http://h:8000", None)
