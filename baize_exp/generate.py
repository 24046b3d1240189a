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

from tqdm.auto import tqdm

from baize_exp.errors import UserError
from baize_exp.io import JsonlError, JsonlWriter, global_rank, read_jsonl

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process in a multi-process launch (torchrun, srun); (0, 1) otherwise."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    return global_rank(), max(1, int(world))


def batch_seed(seed: int, batch_index: int) -> int:
    """The sampling seed of one batch: the same whichever rank runs it."""
    return (seed * 1_000_003 + batch_index) % (2**63)


def sharded_map(
    items: list[Any],
    batch_size: int,
    fn: Callable[[list[Any], int], list[Any]],
    shard_dir: Path,
    key: str,
    rank: int | None = None,
    world: int | None = None,
    poll_s: float = 1.0,
) -> list[Any] | None:
    """`fn(batch, batch_index)` over `items` in batches of `batch_size`, the batches dealt round-robin over the
    ranks; rank 0 gets every result back in input order, the others None. `key` names this piece of work (what it
    depends on): shard files of another key are ignored, finished batches of this key are not redone."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
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
                log.info(
                    "rank 0: waiting for %d of %d batches from the other ranks",
                    len(batches) - len(merged),
                    len(batches),
                )
                waited = time.monotonic()
            time.sleep(poll_s)
    return [x for b in range(len(batches)) for x in merged[b]]


def sample_with(
    fn: Callable[[list[Any], int], list[Any]],
    items: list[Any],
    batch_size: int,
    shard_dir: Path | None,
    key: str,
    desc: str | None = None,
    unit: str = "prompt",
) -> list[Any] | None:
    """`fn(batch, batch_index)` over `items` in batches: in this process, or with `shard_dir` dealt over the ranks
    (`sharded_map`: rank 0 gets everything, the others None). The batches and their indices are the same either
    way, so seeds derived from them are too. With `desc`, a progress bar counts the items done and their rate (a
    rank's bar counts its own share, with no total)."""
    with tqdm(total=None if shard_dir else len(items), desc=desc, unit=unit, disable=desc is None) as bar:

        def counted(batch: list[Any], index: int) -> list[Any]:
            out = fn(batch, index)
            bar.update(len(batch))
            return out

        if shard_dir is not None:
            return sharded_map(items, batch_size, counted, shard_dir, key)
        starts = range(0, len(items), batch_size)
        return [x for b, i in enumerate(starts) for x in counted(items[i : i + batch_size], b)]


# --- backends -----------------------------------------------------------------------------------------------------
# `generate.backend=vllm`: SDF candidates and eval answers come from vLLM's offline engine, the base loaded once and
# each adapter applied per request (enable_lora + LoRARequest), as GPU users of TRL and similar tuners generate. The
# inputs are the same token ids the HF path feeds (our tokenizer, no special tokens added), the sampling settings
# mean the same (temperature 0 = greedy, no top-k, stop strings cut off), and every prompt's seed is derived from the
# run's seed and its index, so a run is reproducible on either backend and the two are comparable (not identical:
# the samplers differ).

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_unavailable(accelerator: str) -> str | None:
    """Why vLLM cannot generate here (None when it can)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, on a CUDA machine)"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is visible"
    if accelerator not in ("gpu", "cuda", "auto"):
        return f"trainer.accelerator={accelerator} keeps the student on the CPU"
    return None


def pick_backend(cfg: Any) -> str:
    """`generate.backend`, or `hf` with one warning when vLLM cannot run here."""
    if cfg.generate.backend != "vllm":
        return "hf"
    why = vllm_unavailable(cfg.trainer.accelerator)
    if why is None:
        return "vllm"
    log.warning(
        "generate.backend=vllm: %s; generating with the HF path instead (same prompts, sampling settings and seeds)",
        why,
    )
    return "hf"


def vllm_sampling(
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: list[str],
    seed: int,
    stop_token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """vLLM SamplingParams arguments meaning what the HF path's generate arguments mean. `stop_token_ids`: the
    tokens the HF path stops at beside the model's EOS (the chat template's end-of-turn, `models.stop_token_ids`);
    vLLM stops at the EOS of the model folder's generation config by itself."""
    greedy = temperature <= 0
    return {
        "n": n,
        "temperature": 0.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p,
        "top_k": -1,
        "max_tokens": max_new_tokens,
        "stop": list(stop),
        "stop_token_ids": list(stop_token_ids or []),
        "seed": seed,
        "skip_special_tokens": True,
    }


def vllm_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank r."""
    fits = [x for x in VLLM_LORA_RANKS if x >= r]
    if not fits:
        raise UserError(f"lora.r={r}: vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]}; use generate.backend=hf")
    return fits[0]


class VllmStudent:
    """The base in vLLM's offline engine, built once per process and reused for every adapter."""

    _engines: dict[str, Any] = {}
    _lora_ids: dict[str, int] = {}

    def __init__(self, cfg: Any, tok: Any) -> None:
        from baize_exp import models as M
        from baize_exp.config import cache_dir

        self.tok = tok
        self.folder = M.model_folder(cfg.model, cache_dir(cfg))
        dtype = str(M.base_dtype(cfg.model, cfg.trainer.precision)).removeprefix("torch.")  # float32, bfloat16, ...
        key = f"{self.folder}|{dtype}"
        if key not in self._engines:
            from vllm import LLM

            g = cfg.generate
            log.info("vLLM: loading %s (%s) with LoRA up to rank %d", self.folder, dtype, vllm_lora_rank(cfg.lora.r))
            self._engines[key] = LLM(
                model=self.folder,
                dtype=dtype,
                enable_lora=True,
                max_lora_rank=vllm_lora_rank(cfg.lora.r),
                max_loras=1,
                seed=cfg.seed,
                gpu_memory_utilization=g.gpu_memory_utilization,
                max_model_len=g.max_model_len or None,
                enforce_eager=g.enforce_eager,
            )
        self.llm = self._engines[key]
        self.stop_ids = M.stop_token_ids(M.generation_config_of(self.folder), tok)

    def generate(
        self,
        prompts: list[str],
        adapter: Path | None,
        first_index: int,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop: list[str],
        seed: int,
    ) -> list[list[str]]:
        """`n` texts per prompt; prompt i (counted from `first_index` in the whole list) samples with seed
        batch_seed(seed, index), so the result does not depend on how the prompts were batched or sharded."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        inputs = [{"prompt_token_ids": self.tok(p, add_special_tokens=False).input_ids} for p in prompts]
        params = [
            SamplingParams(
                **vllm_sampling(
                    n, temperature, top_p, max_new_tokens, stop, batch_seed(seed, first_index + i), self.stop_ids
                )
            )
            for i in range(len(prompts))
        ]
        lora = None
        if adapter is not None:
            # vLLM tells adapters apart by their integer id (and caches them by it): one per adapter folder,
            # process-wide, as the engines are
            ids = VllmStudent._lora_ids
            lora = LoRARequest(Path(adapter).name, ids.setdefault(str(adapter), len(ids) + 1), str(adapter))
        outs = self.llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        return [[c.text.strip() for c in o.outputs] for o in outs]
