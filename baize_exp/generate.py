"""Student generation spread over the ranks of a multi-process launch, with output identical to one process.

Under torchrun/srun (or any launcher that sets RANK and WORLD_SIZE) every rank loads the student; the work is cut
into the same batches one process would make, rank r takes batches r, r + world, ..., and each batch draws from a
generator seeded by its own index, so what a batch samples does not depend on which rank ran it or on what else
ran before. Each rank writes its batches to a shard file the moment they are done (a restarted job keeps them);
rank 0 waits for every shard and returns the results in input order; the other ranks return None.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baize_exp.io import JsonlError, JsonlWriter, global_rank, read_jsonl

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process in a multi-process launch (torchrun, srun); (0, 1) otherwise."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    return global_rank(), max(1, int(world))


def batch_seed(seed: int, batch_index: int) -> int:
    """The sampling seed of one batch: the same whichever rank runs it."""
    return (seed * 1_000_003 + batch_index) % (2**63)


def sharded_map(items: list[Any], batch_size: int, fn: Callable[[list[Any], int], list[Any]], shard_dir: Path,
                key: str, rank: int | None = None, world: int | None = None, poll_s: float = 1.0) -> list[Any] | None:
    """`fn(batch, batch_index)` over `items` in batches of `batch_size`, the batches dealt round-robin over the
    ranks; rank 0 gets every result back in input order, the others None. `key` names this piece of work (what it
    depends on): shard files of another key are ignored, finished batches of this key are not redone."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    path = shard_dir / f"{key}.rank{rank}.jsonl"
    done = {r["batch"]: r["results"] for r in read_jsonl(path, repair_tail=True)}
    with JsonlWriter(path) as w:
        for b in range(rank, len(batches), world):
            if b in done:
                continue
            results = fn(batches[b], b)
            w.write({"batch": b, "results": results})
            done[b] = results
    if rank != 0:
        return None
    merged: dict[int, list[Any]] = {}
    waited = time.monotonic()
    while len(merged) < len(batches):
        merged = {}
        for r in range(world):
            # a line that rank is writing right now does not parse yet: it is read on the next round
            with contextlib.suppress(JsonlError):
                merged.update({rec["batch"]: rec["results"] for rec in read_jsonl(shard_dir / f"{key}.rank{r}.jsonl")})
        if len(merged) < len(batches):
            if time.monotonic() - waited > 60:
                log.info("rank 0: waiting for %d of %d batches from the other ranks", len(batches) - len(merged),
                         len(batches))
                waited = time.monotonic()
            time.sleep(poll_s)
    return [x for b in range(len(batches)) for x in merged[b]]
