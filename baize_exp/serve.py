"""The project's OpenAI-compatible chat server over a local model: `python -m baize_exp.serve`.

It is the offline teacher and judge: `teacher=local` starts it on a free 127.0.0.1 port for the run and the real
`openai` client talks to it, so the code path is the one `teacher=openai` uses. Concurrent requests are gathered
into one batched `generate` (left padding, KV cache): on a 2-core CPU, 16 prompts batched give ~7x the tokens/s
of one at a time. Requests with the same sampling settings share a batch; a request with its own `seed` runs
alone so its sample is reproducible.

Endpoints: POST /v1/chat/completions (n, temperature, top_p, max_tokens, stop, seed, logprobs/top_logprobs,
usage), GET /v1/models, GET /health. Binds loopback only unless --allow-remote is given.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import ipaddress
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from baize_exp.config import ModelConfig
from baize_exp.models import cut_at_stop

log = logging.getLogger("baize_exp.serve")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # None = no logprobs; 0.. = logprobs with that many alternatives
    future: cf.Future = field(default_factory=cf.Future)

    def batch_key(self) -> tuple:
        # Same sampling settings can share one generate (a seeded request runs alone, see BatchWorker).
        sample = self.temperature > 0
        return (sample, round(self.temperature, 4) if sample else 0, round(self.top_p, 4) if sample else 1)


@dataclass
class Choice:
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict] | None = None


class Generator:
    """Batched generation over one model; `run_batch` is called from the single worker thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, model_name: str):
        self.model = model.eval()
        self.tok = tokenizer
        self.tok.padding_side = "left"  # generation continues at the right end of every row
        self.model_name = model_name
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def run_batch(self, reqs: list[GenRequest]) -> list[list[Choice]]:
        r0 = reqs[0]
        rows = [(i, r.prompt_ids) for i, r in enumerate(reqs) for _ in range(r.n)]
        width = max(len(ids) for _, ids in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in rows])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in rows])
        max_new = max(r.max_tokens for r in reqs)
        want_logprobs = any(r.top_logprobs is not None for r in reqs)
        if r0.seed is not None:
            torch.manual_seed(r0.seed)
        kwargs: dict[str, Any] = dict(do_sample=r0.temperature > 0, max_new_tokens=max_new,
                                      pad_token_id=pad, return_dict_in_generate=True, output_logits=want_logprobs)
        if r0.temperature > 0:
            kwargs.update(temperature=r0.temperature, top_p=r0.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new = out.sequences[:, width:]
        logp = torch.stack(out.logits, dim=1).float().log_softmax(-1) if want_logprobs else None
        results: list[list[Choice]] = [[] for _ in reqs]
        for row, (i, _) in enumerate(rows):
            results[i].append(self._choice(reqs[i], new[row], None if logp is None else logp[row]))
        return results

    def _choice(self, req: GenRequest, ids: torch.Tensor, logp: torch.Tensor | None) -> Choice:
        toks = ids.tolist()
        finish = "length"
        for j, t in enumerate(toks):
            if t in self.eos_ids:
                toks, finish = toks[:j], "stop"
                break
        if len(toks) > req.max_tokens:
            toks, finish = toks[: req.max_tokens], "length"
        text = self.tok.decode(toks, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, req.stop)
        if stopped:
            finish = "stop"
        lp = None
        if req.top_logprobs is not None and logp is not None:
            lp = []
            for j, t in enumerate(toks):
                entry = {"token": self.tok.decode([t]), "logprob": float(logp[j, t]), "bytes": None,
                         "top_logprobs": []}
                if req.top_logprobs:
                    vals, idx = logp[j].topk(req.top_logprobs)
                    entry["top_logprobs"] = [{"token": self.tok.decode([int(k)]), "logprob": float(v),
                                              "bytes": None} for v, k in zip(vals, idx, strict=True)]
                lp.append(entry)
        return Choice(text=text, finish_reason=finish, completion_tokens=len(toks), logprobs=lp)


class BatchWorker:
    """One thread owns the model; it takes what has queued up, groups compatible requests, runs batches."""

    def __init__(self, gen: Generator, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.gen, self.max_batch, self.max_wait = gen, max_batch, max_wait_ms / 1000
        self.q: queue.Queue[GenRequest | None] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="batch-worker")
        self.thread.start()

    def submit(self, req: GenRequest) -> cf.Future:
        self.q.put(req)
        return req.future

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            pending = [first]
            deadline = time.monotonic() + self.max_wait
            while len(pending) < self.max_batch:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)
                    break
                pending.append(nxt)
            groups: dict[tuple, list[GenRequest]] = {}
            for r in pending:
                groups.setdefault(r.batch_key() if r.seed is None else ("seed", id(r)), []).append(r)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[GenRequest]) -> None:
        try:
            results = self.gen.run_batch(group)
            self.batches += 1
        except Exception as e:  # a bad batch fails its requests, not the server
            log.exception("batch failed")
            for r in group:
                r.future.set_exception(e)
            return
        for r, res in zip(group, results, strict=True):
            r.future.set_result(res)


def build_app(worker: BatchWorker, api_key: str | None = None):
    app = FastAPI(title="baize_exp local OpenAI-compatible server")
    gen = worker.gen
    stats = {"requests": 0}

    def error(status: int, message: str, etype: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": etype}})

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if (api_key and request.url.path.startswith("/v1/")
                and request.headers.get("authorization", "") != f"Bearer {api_key}"):
            return error(401, "invalid API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": gen.model_name, "requests": stats["requests"], "batches": worker.batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": gen.model_name, "object": "model", "owned_by": "baize_exp"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "body is not valid JSON")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "'messages' must be a non-empty list")
        if body.get("stream"):
            return error(400, "stream=true is not supported by this server yet")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        try:
            req = GenRequest(
                prompt_ids=gen.encode_chat(messages),
                max_tokens=int(next((body[k] for k in ("max_tokens", "max_completion_tokens")
                                     if body.get(k) is not None), 256)),
                temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
                top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
                n=int(body.get("n") or 1), stop=stop, seed=body.get("seed"),
                top_logprobs=(int(body.get("top_logprobs") or 0) if body.get("logprobs") else None),
            )
        except (TypeError, ValueError) as e:
            return error(400, f"bad request field: {e}")
        if req.max_tokens < 1 or req.n < 1 or req.temperature < 0 or not 0 < req.top_p <= 1:
            return error(400, "max_tokens and n must be >= 1, temperature >= 0, 0 < top_p <= 1")
        stats["requests"] += 1
        choices = await asyncio.wrap_future(worker.submit(req))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": gen.model_name,
            "choices": [
                {"index": k, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                 "logprobs": None if c.logprobs is None else {"content": c.logprobs}}
                for k, c in enumerate(choices)
            ],
            "usage": {"prompt_tokens": len(req.prompt_ids) * req.n,
                      "completion_tokens": sum(c.completion_tokens for c in choices),
                      "total_tokens": len(req.prompt_ids) * req.n + sum(c.completion_tokens for c in choices)},
        }

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_for_serving(model: str, adapter: str | None, cache_dir: Path) -> tuple[torch.nn.Module, Any, str]:
    """`model` is a conf/model option name, a local HF dir, or a .gguf file."""
    from omegaconf import OmegaConf

    from baize_exp import models as M

    p = Path(model).expanduser()
    if (CONF_DIR / "model" / f"{model}.yaml").is_file():
        mcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"))
        net, tok = M.load_model_and_tokenizer(mcfg, cache_dir)
        name = "smollm2-135m-instruct" if mcfg.source == "gguf" else mcfg.name
    elif p.suffix == ".gguf" and p.is_file():
        d = M.converted_gguf_dir(p, cache_dir)
        net, tok = M.AutoModelForCausalLM.from_pretrained(d), M.AutoTokenizer.from_pretrained(d)
        name = p.stem
    elif (p / "config.json").is_file():
        net, tok = M.AutoModelForCausalLM.from_pretrained(p), M.AutoTokenizer.from_pretrained(p)
        name = p.name
    else:
        raise M.ModelLoadError(f"--model {model!r}: not a conf/model option, an HF model dir, or a .gguf file")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if adapter:
        net = M.load_adapter(net, adapter)
        name = f"{name}+{Path(adapter).name}"
    return net, tok, name


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m baize_exp.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m", help="conf/model option, HF model dir, or .gguf file")
    ap.add_argument("--adapter", default=None, help="LoRA adapter dir to put on the model")
    ap.add_argument("--served-name", default=None, help="model id reported to clients")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    ap.add_argument("--port-file", default=None, help="write the bound port here once serving")
    ap.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--api-key-env", default=None, help="require 'Bearer <value of this env var>'")
    ap.add_argument("--cache-dir", default=os.environ.get("BAIZE_CACHE", "~/.cache/baize_exp"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not is_loopback(args.host) and not args.allow_remote:
        ap.error(f"--host {args.host} is not a loopback address; pass --allow-remote to expose the server")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        ap.error(f"--api-key-env {args.api_key_env}: that environment variable is empty")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, tok, name = load_for_serving(args.model, args.adapter, Path(args.cache_dir).expanduser())
    worker = BatchWorker(Generator(net, tok, args.served_name or name), args.max_batch, args.max_wait_ms)
    app = build_app(worker, api_key)

    import uvicorn

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    if args.port_file:
        tmp = Path(args.port_file).with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    log.info("serving %s on http://%s:%d/v1 (max_batch=%d)", worker.gen.model_name, args.host, port, args.max_batch)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
