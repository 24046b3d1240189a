"""`baize-serve` / `python -m baize_exp.serve`: serve a local model over OpenAI's chat completions API."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from pathlib import Path

from baize_exp.config import cache_dir
from baize_exp.errors import exit_on_error
from baize_exp.serve.address import is_loopback

log = logging.getLogger("baize_exp.serve")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="baize-serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m", help="conf/model option, HF model dir, or .gguf file")
    ap.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="LoRA adapter dir to put on the model. One unnamed adapter: the server answers as <model>+<dir name>. "
        "NAME=DIR (repeatable): the base is held once and answers under its own name, each adapter under NAME, "
        "each in the prompt format it was trained in (its prompt_format.json)",
    )
    ap.add_argument(
        "--served-name", default=None, help="model id reported to clients (with named adapters: the base's)"
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    ap.add_argument("--port-file", default=None, help="write the bound port here once serving")
    ap.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")
    ap.add_argument("--max-batch", type=int, default=16, help="rows (answers) decoded together at most")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="an idle server waits this long to gather a burst")
    ap.add_argument("--queue-size", type=int, default=256, help="requests waiting for a row at most; then 429")
    ap.add_argument(
        "--request-timeout-s",
        type=float,
        default=None,
        help="answer 504 and drop a request not done after this (default: no deadline)",
    )
    ap.add_argument(
        "--max-n", type=int, default=None, help="most answers one request may ask for (default: --max-batch)"
    )
    ap.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=60.0,
        help="on SIGTERM/SIGINT, how long in-flight requests may take to finish",
    )
    ap.add_argument("--api-key-env", default=None, help="require 'Bearer <value of this env var>'")
    ap.add_argument(
        "--cache-dir", default=str(cache_dir()), help="converted models (default: BAIZE_CACHE, else ~/.cache/baize_exp)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not is_loopback(args.host) and not args.allow_remote:
        ap.error(f"--host {args.host} is not a loopback address; pass --allow-remote to expose the server")
    for key in ("max_batch", "queue_size"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or (args.request_timeout_s is not None and args.request_timeout_s <= 0):
        ap.error("--max-wait-ms must be >= 0 and --request-timeout-s > 0")
    if args.max_n is not None and not args.max_n >= 1:
        ap.error("--max-n must be >= 1")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        ap.error(f"--api-key-env {args.api_key_env}: that environment variable is empty")

    serve(args, api_key)


def serve(args: argparse.Namespace, api_key: str | None) -> None:
    """Load the model and its adapters and serve them until a signal. (The model code is imported here, after the
    arguments were checked: a refused command answers in a second, not after torch and transformers load.)"""
    from baize_exp.models import load_for_serving
    from baize_exp.serve.adapters import load_served, parse_adapter_args
    from baize_exp.serve.app import build_app
    from baize_exp.serve.engine import DecodeEngine
    from baize_exp.serve.worker import BatchWorker

    with exit_on_error("baize-serve"):
        adapters, named = parse_adapter_args(args.adapter)
        net, tok, name = load_for_serving(args.model, None, Path(args.cache_dir).expanduser())
    if adapters and not named:  # the single-adapter server: only base+adapter is served, as before
        dir_name, path = next(iter(adapters.items()))
        name = args.served_name or f"{name}+{dir_name}"
        net, served = load_served(net, name, {name: path}, serve_base=False)
    else:
        name = args.served_name or name
        net, served = load_served(net, name, adapters)
    worker = BatchWorker(DecodeEngine(net, tok, name, served), args.max_batch, args.max_wait_ms, args.queue_size)
    app = build_app(worker, api_key, args.request_timeout_s, args.max_n, aliases=(args.model,))

    import uvicorn

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout_s))
    if args.port_file:
        tmp = Path(args.port_file).with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    log.info(
        "serving %s on http://%s:%d/v1 (max_batch=%d, queue_size=%d)",
        ", ".join(worker.engine.served),
        args.host,
        port,
        args.max_batch,
        args.queue_size,
    )
    # uvicorn handles the signal (stops accepting, waits for in-flight requests), then re-raises it once it is done;
    # these handlers make that re-raise a no-op so the worker is stopped cleanly and the exit status is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: log.info("signal %d: in-flight requests finished, exiting", s))
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
