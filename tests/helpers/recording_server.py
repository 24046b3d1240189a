"""The project's own server (baize_exp.serve: app, batch worker, decode engine) run in-process on 127.0.0.1 with a
decode engine that also keeps every prompt it was asked to complete, so tests can assert on what a judge received."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from baize_exp.chat import ChatClient
from baize_exp.models import load_for_serving
from baize_exp.serve.app import build_app
from baize_exp.serve.engine import DecodeEngine
from baize_exp.serve.worker import BatchWorker


class RecordingEngine(DecodeEngine):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.received: list[str] = []  # decoded chat-templated prompts, in the order they joined the batch

    def add(self, reqs):
        self.received += [self.detok.decode(r.prompt_ids) for r in reqs]  # the worker thread's tokenizer copy
        return super().add(reqs)


@dataclass
class Recording:
    base_url: str
    api_key: str
    engine: RecordingEngine

    @property
    def received(self) -> list[str]:
        return self.engine.received

    def client(self, **kw) -> ChatClient:
        return ChatClient(self.base_url, self.api_key, self.engine.model_name, **kw)


@contextmanager
def recording_server(model: str = "tiny", max_batch: int = 16) -> Iterator[Recording]:
    net, tok, name = load_for_serving(model, None, Path(os.environ["BAIZE_CACHE"]))
    engine = RecordingEngine(net, tok, name)
    worker = BatchWorker(engine, max_batch=max_batch)
    key = secrets.token_hex(8)
    server = uvicorn.Server(uvicorn.Config(build_app(worker, key), log_level="warning"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield Recording(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", key, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        worker.stop()
