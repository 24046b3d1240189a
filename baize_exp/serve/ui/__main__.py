"""`baize-chat` / `python -m baize_exp.serve.ui`: the chat page and the blind arena over a run's models."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from baize_exp.config import cache_dir
from baize_exp.errors import UserError, exit_on_error
from baize_exp.human import VoteLog, votes_path
from baize_exp.serve import ui
from baize_exp.serve.address import is_loopback

log = logging.getLogger("baize_exp.serve")
MIN_TOKEN = 16  # characters: something `openssl rand -hex 8` or longer gives


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="baize-chat", description=ui.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("paths", nargs="+", type=Path, help="run dirs (base, v1, v2) and/or LoRA adapter dirs")
    ap.add_argument(
        "--model", default=None, help="the base (conf/model option, HF dir, .gguf) when no run dir names it"
    )
    ap.add_argument("--host", default="127.0.0.1", help="any address but loopback needs --token or --token-env")
    ap.add_argument("--port", type=int, default=7860, help="0 picks a free port (printed)")
    ap.add_argument("--token", default=None, help="required on every request (visible in ps: prefer --token-env)")
    ap.add_argument("--token-env", default=None, help="read the token from this environment variable")
    ap.add_argument("--votes", type=Path, default=None, help="votes file (default: <first run>/eval/human_votes.jsonl)")
    ap.add_argument("--max-batch", type=int, default=8, help="answers decoded together at most")
    ap.add_argument("--cache-dir", default=str(cache_dir()), help="converted models (default: BAIZE_CACHE)")
    return ap.parse_args(argv)


def token_of(args: argparse.Namespace) -> str | None:
    """The token, and the rule that binding beyond loopback needs one (UserError otherwise)."""
    token = os.environ.get(args.token_env, "") if args.token_env else args.token
    if args.token_env and not token:
        raise UserError(f"--token-env {args.token_env}: that environment variable is empty")
    if token is not None and len(token) < MIN_TOKEN:
        raise UserError(f"the token has {len(token)} characters; use {MIN_TOKEN} or more (openssl rand -hex 16)")
    if not is_loopback(args.host) and not token:
        raise UserError(
            f"--host {args.host} is not a loopback address: pass --token-env VAR (or --token) so that only holders "
            f"of the token can use the page"
        )
    return token


def build(args: argparse.Namespace, token: str | None):
    """The FastAPI app: the OpenAI API over one model holding every adapter, and the page mounted on it."""
    from baize_exp import models as M
    from baize_exp.serve.adapters import load_served
    from baize_exp.serve.app import build_app
    from baize_exp.serve.engine import DecodeEngine
    from baize_exp.serve.ui.app import mount
    from baize_exp.serve.ui.arena import Arena
    from baize_exp.serve.ui.catalog import build_catalog
    from baize_exp.serve.worker import BatchWorker

    catalog = build_catalog(args.paths, args.model)
    votes = args.votes or (votes_path(catalog.home) if catalog.home else None)
    if votes is None:
        raise UserError("no run dir among the paths, so there is no run to keep votes in: pass --votes FILE")
    cache = Path(args.cache_dir).expanduser()
    if catalog.model_config is not None:
        net, tok = M.load_model_and_tokenizer(catalog.model_config, cache)
    else:
        net, tok, _ = M.load_for_serving(args.model, None, cache)
    adapters = {m.label: m.adapter for m in catalog.models if m.adapter is not None}
    net, served = load_served(net, "base", adapters)
    worker = BatchWorker(DecodeEngine(net, tok, "base", served), args.max_batch)
    app = build_app(worker, api_key=token)
    mount(app, catalog, Arena(catalog, VoteLog(votes)), token, loopback=is_loopback(args.host) and not token)
    return app, worker, catalog, votes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with exit_on_error("baize-chat"):
        token = token_of(args)
        app, worker, catalog, votes = build(args, token)
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(
            f"baize-chat: cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port", file=sys.stderr
        )
        sys.exit(2)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}/"
    print(
        f"baize-chat: {url}{'?token=<your token>' if token else ''}  models: "
        f"{', '.join(m.label for m in catalog.models)}; votes -> {votes}",
        flush=True,
    )
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
