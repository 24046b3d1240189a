"""The project's own server (baize_exp.serve: app, batch worker, generator) run in-process on 127.0.0.1 with a
generator that also keeps every prompt it was asked to complete, so tests can assert on what a judge received."""

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
from baize_exp.serve import BatchWorker, Generator, build_app, load_for_serving


class RecordingGenerator(Generator):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.received: list[str] = []  # decoded chat-templated prompts, in arrival order

    def run_batch(self, reqs):
        self.received += [self.tok.decode(r.prompt_ids) for r in reqs]
        return super().run_batch(reqs)


@dataclass
class Recording:
    base_url: str
    api_key: str
    gen: RecordingGenerator

    @property
    def received(self) -> list[str]:
        return self.gen.received

    def client(self, **kw) -> ChatClient:
        return ChatClient(self.base_url, self.api_key, self.gen.model_name, **kw)


@contextmanager
def recording_server(model: str = "tiny", max_batch: int = 16) -> Iterator[Recording]:
    net, tok, name = load_for_serving(model, None, Path(os.environ["BAIZE_CACHE"]))
    gen = RecordingGenerator(net, tok, name)
    worker = BatchWorker(gen, max_batch=max_batch)
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
        yield Recording(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", key, gen)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        worker.stop()
