"""Start and stop the project's server for `backend: local`, and hand out clients for teacher and judge."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from baize_exp.chat.client import ChatClient, ChatError

log = logging.getLogger(__name__)
KEY_ENV = "BAIZE_LOCAL_SERVER_KEY"  # a per-server random token, passed by environment, never written


class LocalServer:
    """`python -m baize_exp.serve` in a child process on a free 127.0.0.1 port; a context manager."""

    def __init__(
        self,
        model: str,
        adapter: str | list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = 16,
        cache_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 300.0,
        served_name: str | None = None,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        request_timeout_s: float | None = None,
        shutdown_timeout_s: float = 60.0,
        max_n: int | None = None,
    ):
        self.model, self.adapter, self.host, self.port = model, adapter, host, port
        self.max_batch, self.cache_dir, self.startup_timeout_s = max_batch, cache_dir, startup_timeout_s
        self.served_name = served_name
        self.max_wait_ms, self.queue_size, self.request_timeout_s = max_wait_ms, queue_size, request_timeout_s
        self.shutdown_timeout_s, self.max_n = shutdown_timeout_s, max_n
        self.log_path = Path(log_path) if log_path else None
        self.api_key = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> LocalServer:
        import tempfile

        port_file = Path(tempfile.mkdtemp(prefix="baize_serve_")) / "port"
        cmd = [
            sys.executable,
            "-m",
            "baize_exp.serve",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--port-file",
            str(port_file),
            "--max-batch",
            str(self.max_batch),
            "--max-wait-ms",
            str(self.max_wait_ms),
            "--queue-size",
            str(self.queue_size),
            "--shutdown-timeout-s",
            str(self.shutdown_timeout_s),
            "--api-key-env",
            KEY_ENV,
        ]
        if self.request_timeout_s:
            cmd += ["--request-timeout-s", str(self.request_timeout_s)]
        if self.max_n:
            cmd += ["--max-n", str(self.max_n)]
        for adapter in [self.adapter] if isinstance(self.adapter, (str, Path)) else self.adapter or []:
            cmd += ["--adapter", str(adapter)]  # several: NAME=DIR each, the base held once
        if self.cache_dir:
            cmd += ["--cache-dir", str(self.cache_dir)]
        if self.served_name:
            cmd += ["--served-name", self.served_name]
        env = {**os.environ, KEY_ENV: self.api_key, "HF_HUB_OFFLINE": "1"}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        log.info("starting local chat server: %s", " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-2000:] if self.log_path and self.log_path.exists() else ""
                raise ChatError(f"local chat server exited with {self.proc.returncode} while starting. {tail}")
            if port_file.is_file():
                self.port = int(port_file.read_text())
                try:
                    with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                        if r.status == 200:
                            log.info("local chat server ready at %s", self.base_url)
                            return self
                except OSError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise ChatError(f"local chat server did not become ready in {self.startup_timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # the server finishes in-flight requests on SIGTERM, then exits
            try:
                self.proc.wait(timeout=self.shutdown_timeout_s + 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Backends:
    """Clients for the roles a run needs (teacher, judge), sharing one local server per served model.

    Servers start on first use and stop in `close()`, which the pipeline always calls.
    """

    def __init__(self, cfg: Any, run_dir: Path, cache_dir: Path):
        self.cfg, self.run_dir, self.cache_dir = cfg, run_dir, cache_dir
        self.servers: dict[tuple, LocalServer] = {}

    def client(self, role: str) -> ChatClient:
        bcfg = self.cfg[role]
        if bcfg.backend == "local":
            s = bcfg.serve
            key = (s.model, s.adapter, s.host, s.port)
            if key not in self.servers:
                self.servers[key] = LocalServer(
                    s.model,
                    s.adapter,
                    s.host,
                    s.port,
                    s.max_batch,
                    self.cache_dir,
                    log_path=self.run_dir / f"serve-{len(self.servers)}.log",
                    startup_timeout_s=s.startup_timeout_s,
                    served_name=bcfg.model,
                    max_wait_ms=s.max_wait_ms,
                    queue_size=s.queue_size,
                    request_timeout_s=s.request_timeout_s,
                    max_n=s.max_n,
                ).start()
            srv = self.servers[key]
            # the run made this server's key and is its only client: no probe request before the fan-out
            return ChatClient.from_config(
                bcfg, base_url=srv.base_url, api_key=srv.api_key, role=role, probe_first=False
            )
        return ChatClient.from_config(bcfg, role=role)

    def close(self) -> None:
        for s in self.servers.values():
            s.stop()
        self.servers.clear()


def _die_with_parent() -> None:
    """In the server's child process: ask Linux for SIGTERM when the parent dies, so a killed run (kill -9, OOM)
    leaves no server holding a model in memory. SIGTERM lets the server finish in-flight requests and exit."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
