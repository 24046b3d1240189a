"""Stage `plan`: does LoRA training of this model fit on these GPUs, and with which strategy and precision?

    python run.py model=13b lora.r=8 stages=[plan]
    baize-plan model=30b trainer.devices=8 plan.gpu_memory_gb=40      # same conf tree, no pipeline

The model is built on the meta device from its architecture alone (a local model's config.json, else the
architecture numbers in `conf/model/*.yaml` in the HF class of `model.family`: Llama, Qwen2 with its q/k/v biases,
Mistral), so nothing is downloaded and no weight is read; LoRA is attached on meta too, and the parameter counts
are peft's own (grouped k/v widths, untied lm_heads and biases included). Memory per GPU is then computed for
every strategy × precision from the formulas below, for `trainer.devices × trainer.num_nodes` GPUs of
`plan.gpu_memory_gb` GiB each. It writes `<run>/plan/plan.json` and `plan.md` and prints the table.

Formulas (bytes; N = frozen base params, T = trainable LoRA params, D = GPUs in total, G = GPUs per node):

- weights: base N × {4 (32-true), 2 (bf16/16-mixed: the frozen base is held in the compute dtype, as DeepSpeed does
  when bf16/fp16 is on, and as the trainer loads it: `model.dtype=auto`; an explicit `model.dtype` wins in every
  row), 1 (int8: LLM.int8 decoder-layer linears), 0.516 (nf4:
  4 bits + 0.127 bits of double-quantized block constants, QLoRA)}; embeddings, norms and lm_head of a quantized
  base stay in 2 bytes. LoRA weights T × 4 (fp32 master), or T × 2 under DeepSpeed half precision, whose fp32
  master copy is counted as optimizer state.
- grads: T × 4 (T × 2 under DeepSpeed half precision). The frozen base has none.
- optimizer (AdamW): T × 8 (exp_avg, exp_avg_sq in fp32), T × 12 under DeepSpeed half precision (+ fp32 master).
  So trainable weights+grads+optimizer are 16 bytes/param in every regime, as in the ZeRO paper.
- sharding: auto/ddp shard nothing; ZeRO-2 divides grads and optimizer by D; ZeRO-3 divides weights too, plus a
  working set of 2 gathered blocks (the layer being computed and the prefetched next one; the largest of a decoder
  layer, the embedding and lm_head) in the weights' dtype; ZeRO-3 offload keeps only that working set on the GPU
  and moves the sharded weights, fp32 master, grads and optimizer state to CPU (`cpu/node` column: G/D of them).
  bitsandbytes-quantized bases are not sharded by ZeRO-3 here: those rows say n/a.
- activations per micro-batch (s = seq_len, b = micro batch, h = hidden, i = MLP intermediate, h_kv = key/value
  width, a = heads, L = layers, V = vocab), counted the way Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models": a GPT layer keeps s·b·h·(34 + 5·a·s/h) bytes in 16-bit) count them,
  i.e. what autograd keeps for the backward, but for a LLaMA layer (RMSNorm, SwiGLU MLP, grouped KV):
  per layer s·b·(12·h + 4·h_kv + 8·i) bytes in 16-bit (2 RMSNorm inputs, 2 norm outputs, Q, K, V, attention
  output; gate, up, SiLU(gate), their product);
  + with eager attention Korthikanti's 5·a·s²·b (softmax output, dropout mask and output: HF runs the dropout even
    at p=0, and its softmax in fp32, so 6·a·s²·b under mixed precision); sdpa/flash keep none
    (`plan.flash_attention`, the default);
  + per LoRA-adapted linear, the rank-r intermediate (2·s·b·r) and with lora.dropout > 0 the dropout output and
    mask (5·s·b·d_in in fp32, ≈4·s·b·d_in measured under mixed precision);
  + under mixed precision, what HF and peft add: RMSNorm keeps its input in fp32 (+4·s·b·h), and peft runs each
    LoRA branch in the adapter's fp32 so autocast keeps one more half copy of its input (+2·s·b·d_in per module);
  32-true doubles the 2-byte terms. Logits: s·b·V·(2 + 4 + 4) bytes (the logits, their fp32 copy for the loss,
  the log-softmax it keeps; s·b·V·8 in fp32). Activations are per GPU; none of these strategies shards them.
  tests/test_plan.py checks this against the bytes autograd really saves on a real model.
- gradient checkpointing (per decoder layer) keeps one hidden state per layer, L·s·b·h (×2 bytes), plus one layer's
  activations while it is recomputed, plus the logits.
- + `plan.overhead_gb` per GPU (CUDA context, NCCL buffers, allocator slack).
These are estimates for choosing a setup (they ignore fragmentation and temporary buffers of individual kernels);
measure peak memory on the first steps of the real run.

When the run collects (`collect` among `stages`), the plan also says what the collection would cost before any of
it is spent: requests, prompt and completion tokens, USD online and through the Batch API (`chat.cost`), for this
run's seeds as if none were collected yet (`baize-collect ... --estimate` counts only the seeds left in an existing
collection, refined by its finished dialogs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from baize_exp import models as M
from baize_exp.chat.cost import Estimate, estimate_collection
from baize_exp.config import Config, cache_dir
from baize_exp.data import load_seeds
from baize_exp.errors import UserError
from baize_exp.stages.base import Stage

GIB = 1024**3
STRATEGIES = ("auto/ddp", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "int8 base", "nf4 base")
# bytes per frozen base parameter inside decoder-layer linears, and elsewhere (embeddings, norms, lm_head), for a
# bitsandbytes base; the float rows take the dtype the trainer loads (base_bytes_per_param)
_BASE_BYTES = {"int8 base": (1.0, 2.0), "nf4 base": (0.5 + 0.127 / 8, 2.0)}


@dataclass
class ModelShape:
    """What the planner needs from the meta-built model: parameter counts and architecture numbers."""

    total: int  # all parameters, LoRA included
    trainable: int  # LoRA (requires_grad) parameters
    frozen_linear: int  # frozen parameters of decoder-layer nn.Linear weights (what bitsandbytes quantizes)
    frozen_other: int  # the rest of the frozen base: embeddings, norms, lm_head
    largest_block: int  # params of the largest of one decoder layer, the embedding, lm_head (ZeRO-3 gathers it)
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # num_key_value_heads × head_dim
    heads: int
    vocab: int
    lora_inputs: list[int]  # d_in of each LoRA-adapted linear in one decoder layer


def build_meta_model(mcfg: Any, lcfg: Any) -> torch.nn.Module:
    """Base + LoRA on the meta device: real module structure and parameter shapes, no memory, no weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(M.architecture(mcfg))  # the family's class (Llama, Qwen2, ...)
        M.check_lora_targets(model, lcfg.target_modules)  # one line naming them, not peft's error or a silent miss
        return get_peft_model(model, M.lora_config(lcfg))


def model_shape(mcfg: Any, lcfg: Any) -> ModelShape:
    peft_model = build_meta_model(mcfg, lcfg)
    base = peft_model.get_base_model()
    conf = base.config
    total, trainable = M.count_parameters(peft_model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:  # the activation formulas are for LLaMA-style decoders (Llama, Mistral, Qwen, SmolLM, ...)
        raise UserError(
            f"model={mcfg.name}: {type(base).__name__} has no `model.layers`; the planner supports "
            f"LLaMA-style decoder models"
        )
    frozen_linear = 0
    for layer in layers:
        # inside a decoder layer the frozen 2-D parameters are exactly the linear weights (norms are 1-D)
        frozen_linear += sum(p.numel() for p in layer.parameters() if not p.requires_grad and p.dim() == 2)
    blocks = [sum(p.numel() for p in layers[0].parameters()), base.get_input_embeddings().weight.numel()]
    if base.get_output_embeddings() is not None:
        blocks.append(base.get_output_embeddings().weight.numel())
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    lora_inputs = [
        m.in_features for n, m in layers[0].named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")
    ]
    return ModelShape(
        total=total,
        trainable=trainable,
        frozen_linear=frozen_linear,
        frozen_other=total - trainable - frozen_linear,
        largest_block=max(blocks),
        layers=len(layers),
        hidden=conf.hidden_size,
        intermediate=conf.intermediate_size,
        kv_width=conf.num_key_value_heads * head_dim,
        heads=conf.num_attention_heads,
        vocab=conf.vocab_size,
        lora_inputs=lora_inputs,
    )


def activation_bytes(
    sh: ModelShape, seq: int, batch: int, precision: str, flash: bool, lora_r: int, lora_dropout: float
) -> dict[str, float]:
    """Activation bytes of one micro-batch on one GPU: per layer, logits, and the totals without (`full`) and with
    (`ckpt`) gradient checkpointing; see the module doc."""
    fp32 = precision == "32-true"
    scale = 2.0 if fp32 else 1.0  # the formula counts 2-byte elements
    sb = seq * batch
    layer = sb * (12 * sh.hidden + 4 * sh.kv_width + 8 * sh.intermediate) * scale
    if not fp32:  # HF's RMSNorm keeps its input in fp32 (+2 bytes × 2 norms)
        layer += sb * 4 * sh.hidden
    if not flash:  # eager attention: softmax output, dropout mask and output (HF's softmax runs in fp32)
        layer += (5 if fp32 else 6) * sh.heads * seq * seq * batch
    for d_in in sh.lora_inputs:
        layer += 2 * sb * lora_r * scale  # the rank-r intermediate
        if not fp32:  # peft casts the input to the adapter's fp32, autocast back: one more half copy per module
            layer += 2 * sb * d_in
        if lora_dropout > 0:  # dropout output + mask: 4 + 1 bytes in fp32; ~4 measured under mixed precision
            layer += sb * d_in * (5 if fp32 else 4)
    logits = sb * sh.vocab * (8.0 if fp32 else 10.0)
    kept_hidden = sh.layers * sb * sh.hidden * 2 * scale
    return {
        "per_layer": layer,
        "logits": logits,
        "checkpointed_hidden": kept_hidden,
        "full": sh.layers * layer + logits,
        "ckpt": kept_hidden + layer + logits,
    }


def base_bytes_per_param(mcfg: Any, precision: str) -> tuple[float, float]:
    """Bytes per frozen base parameter (decoder-layer linears, the rest) for a precision row: the dtype the trainer
    loads the base in (`models.base_dtype`: model.dtype, or the precision's), or a bitsandbytes format."""
    if precision in _BASE_BYTES:
        return _BASE_BYTES[precision]
    size = float(M.base_dtype(mcfg, precision).itemsize)
    return size, size


def base_weight_bytes(sh: ModelShape, mcfg: Any, precision: str) -> float:
    """The frozen base's weights in bytes, as the trainer holds them for `precision`."""
    linear_b, other_b = base_bytes_per_param(mcfg, precision)
    return sh.frozen_linear * linear_b + sh.frozen_other * other_b


def memory_row(
    sh: ModelShape,
    mcfg: Any,
    strategy: str,
    precision: str,
    world: int,
    per_node: int,
    act: dict[str, float],
    overhead_gb: float,
    gpu_gb: float,
) -> dict:
    """Bytes per GPU (and per node's CPU, for offload) of one strategy × precision; see the module doc."""
    row: dict[str, Any] = {"strategy": strategy, "precision": precision}
    quantized = precision.endswith("base")
    if quantized and strategy.startswith("deepspeed_stage_3"):
        return {**row, "note": "n/a: ZeRO-3 does not shard a bitsandbytes base here"}
    linear_b, other_b = base_bytes_per_param(mcfg, precision)
    base = base_weight_bytes(sh, mcfg, precision)
    ds_half = strategy.startswith("deepspeed") and precision in ("bf16-mixed", "16-mixed")
    w_t, g_t, o_t = (2.0, 2.0, 12.0) if ds_half else (4.0, 4.0, 8.0)
    T = sh.trainable
    working_set = 2 * sh.largest_block * max(linear_b, other_b)
    cpu = 0.0
    if strategy in ("auto/ddp", "deepspeed_stage_2"):
        weights = base + T * w_t
        grads = T * g_t / (world if strategy == "deepspeed_stage_2" else 1)
        optim = T * o_t / (world if strategy == "deepspeed_stage_2" else 1)
    elif strategy == "deepspeed_stage_3":
        weights = (base + T * w_t) / world + working_set
        grads, optim = T * g_t / world, T * o_t / world
    else:  # ZeRO-3 with parameters and optimizer offloaded to CPU
        weights, grads, optim = working_set, 0.0, 0.0
        cpu = (base + T * (w_t + g_t + o_t)) / world * per_node
    over = overhead_gb * GIB
    total = weights + grads + optim + act["full"] + over
    total_ckpt = weights + grads + optim + act["ckpt"] + over
    gb = lambda x: round(x / GIB, 4)  # noqa: E731
    return {
        **row,
        "weights_gb": gb(weights),
        "grads_gb": gb(grads),
        "optimizer_gb": gb(optim),
        "activations_gb": gb(act["full"]),
        "activations_ckpt_gb": gb(act["ckpt"]),
        "total_gb": gb(total),
        "total_ckpt_gb": gb(total_ckpt),
        "cpu_per_node_gb": gb(cpu) if cpu else None,
        "fits": total <= gpu_gb * GIB,
        "fits_ckpt": total_ckpt <= gpu_gb * GIB,
    }


def gpus_per_node(cfg: Any) -> tuple[int, str]:
    """GPUs per node for the plan, and where the number came from."""
    if cfg.plan.gpus_per_node:
        return int(cfg.plan.gpus_per_node), "plan.gpus_per_node"
    dev = cfg.trainer.devices
    if isinstance(dev, (list, tuple)) or (hasattr(dev, "__len__") and not isinstance(dev, str)):
        return len(dev), "trainer.devices (a list)"
    if str(dev).lstrip("-").isdigit() and int(dev) >= 1:
        return int(dev), "trainer.devices"
    n = torch.cuda.device_count()
    return max(n, 1), (
        f"trainer.devices={dev}: the {n} visible CUDA GPUs"
        if n
        else f"trainer.devices={dev} and no visible GPU: 1 (set plan.gpus_per_node or trainer.devices)"
    )


def make_plan(cfg: Config) -> dict:
    """The whole plan as plain data (what plan.json holds)."""
    sh = model_shape(cfg.model, cfg.lora)
    per_node, source = gpus_per_node(cfg)
    world = per_node * int(cfg.trainer.num_nodes)
    p = cfg.plan
    seq = int(p.seq_len or cfg.train.max_length)
    batch = int(p.micro_batch_size or cfg.train.batch_size)
    rows = []
    for strategy in STRATEGIES:
        for precision in PRECISIONS:
            act = activation_bytes(sh, seq, batch, precision, p.flash_attention, cfg.lora.r, cfg.lora.dropout)
            rows.append(
                memory_row(sh, cfg.model, strategy, precision, world, per_node, act, p.overhead_gb, p.gpu_memory_gb)
            )
    chosen = (
        "auto/ddp"
        if cfg.strategy.name in ("auto", "ddp")
        else f"deepspeed_stage_{cfg.strategy.stage}" + ("_offload" if cfg.strategy.offload_parameters else "")
    )
    return {
        "model": cfg.model.name,
        "source": cfg.model.source,
        "lora": {"r": cfg.lora.r, "target_modules": list(cfg.lora.target_modules), "dropout": cfg.lora.dropout},
        "params": {
            "total": sh.total,
            "trainable": sh.trainable,
            "base": sh.total - sh.trainable,
            "trainable_percent": round(100 * sh.trainable / sh.total, 4),
        },
        "shape": {k: v for k, v in asdict(sh).items() if k not in ("total", "trainable")},
        "setup": {
            "gpus_per_node": per_node,
            "gpus_per_node_from": source,
            "num_nodes": int(cfg.trainer.num_nodes),
            "world_size": world,
            "gpu_memory_gb": p.gpu_memory_gb,
            "seq_len": seq,
            "micro_batch_size": batch,
            "flash_attention": p.flash_attention,
            "overhead_gb": p.overhead_gb,
        },
        "configured": {"strategy": chosen, "precision": str(cfg.trainer.precision)},
        "rows": rows,
        "recommendation": recommend(rows),
    }


def recommend(rows: list[dict]) -> str | None:
    """The first setup that fits, in rough order of expected speed (no sharding traffic, no recompute first)."""
    by = {(r["strategy"], r["precision"]): r for r in rows}
    order = [(s, "bf16-mixed", ck) for ck in (False, True) for s in STRATEGIES]
    order += [("auto/ddp", q, True) for q in ("int8 base", "nf4 base")]
    for s, prec, ck in order:
        r = by[(s, prec)]
        if r.get("fits_ckpt" if ck else "fits"):
            return f"strategy={s.replace('auto/ddp', 'ddp')} precision={prec}" + (
                " with gradient checkpointing" if ck else ""
            )
    return None


def _human(n: int) -> str:
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


def format_table(plan: dict) -> str:
    """A readable markdown table (what is printed and written to plan.md)."""
    pa, su = plan["params"], plan["setup"]
    lines = [
        f"# Memory plan: {plan['model']} + LoRA r={plan['lora']['r']} on {plan['lora']['target_modules']}",
        "",
        f"params: total {pa['total']:,} ({_human(pa['total'])}), trainable {pa['trainable']:,} "
        f"({_human(pa['trainable'])}, {pa['trainable_percent']}%), base {pa['base']:,}",
        f"setup: {su['world_size']} GPU(s) = {su['gpus_per_node']}/node ({su['gpus_per_node_from']}) × "
        f"{su['num_nodes']} node(s), {su['gpu_memory_gb']} GiB each; micro batch {su['micro_batch_size']} × "
        f"seq {su['seq_len']}, {'sdpa/flash' if su['flash_attention'] else 'eager'} attention, "
        f"+{su['overhead_gb']} GiB overhead",
        "",
        "GiB per GPU. act = activations; ckpt = with gradient checkpointing; fit: yes / ckpt (only with "
        "checkpointing) / no. * = the configured strategy and precision.",
        "",
        "| strategy | precision | weights | grads | optim | act | act ckpt | total | total ckpt | cpu/node | fit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    conf = plan["configured"]
    for r in plan["rows"]:
        star = "*" if (r["strategy"], r["precision"]) == (conf["strategy"], conf["precision"]) else ""
        if "note" in r:
            lines.append(f"| {r['strategy']}{star} | {r['precision']} | {r['note']} |||||||||")
            continue
        fit = "yes" if r["fits"] else "ckpt" if r["fits_ckpt"] else "no"
        cpu = "" if r["cpu_per_node_gb"] is None else f"{r['cpu_per_node_gb']:.1f}"
        lines.append(
            f"| {r['strategy']}{star} | {r['precision']} | {r['weights_gb']:.2f} | {r['grads_gb']:.3f} | "
            f"{r['optimizer_gb']:.3f} | {r['activations_gb']:.2f} | {r['activations_ckpt_gb']:.2f} | "
            f"{r['total_gb']:.2f} | {r['total_ckpt_gb']:.2f} | {cpu} | {fit} |"
        )
    lines += [
        "",
        f"first fit (fastest first): {plan['recommendation'] or 'nothing fits: more GPUs or a smaller model'}",
        "",
        "Formulas: see `baize_exp/stages/plan.py` (module docstring).",
    ]
    return "\n".join(lines) + "\n"


def collection_estimate(cfg: Any) -> Estimate:
    """What collecting this run's seeds would cost, none collected yet (counted in the teacher's tokens when it is
    the local one)."""
    tcfg = cfg.teacher
    tokenizer = M.tokenizer_for_serving(tcfg.serve.model, cache_dir(cfg)) if tcfg.backend == "local" else None
    seeds = [s.question for s in load_seeds(cfg.data)]
    return estimate_collection(seeds, cfg.collect, tcfg, tokenizer=tokenizer)


def run(cfg: Config, run_dir: Path, backends: Any = None) -> dict:
    """The pipeline's plan stage: print the table, write plan/plan.json and plan/plan.md; return a summary. With
    `collect` among the stages, the collection's estimated cost too."""
    plan = make_plan(cfg)
    table = format_table(plan)
    est = collection_estimate(cfg) if "collect" in cfg.stages else None
    if est is not None:
        plan["collect_estimate"] = est.as_dict()
        table += "\n## The collection, before anything is spent\n\n" + "\n".join(est.lines()) + "\n"
    out = run_dir / "plan"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    (out / "plan.md").write_text(table)
    print(table, flush=True)  # the answer the user asked for: on the console, not only in the log
    summary = {
        "params_total": plan["params"]["total"],
        "params_trainable": plan["params"]["trainable"],
        "world_size": plan["setup"]["world_size"],
        "fitting_setups": sum(1 for r in plan["rows"] if r.get("fits")),
        "fitting_setups_ckpt": sum(1 for r in plan["rows"] if r.get("fits_ckpt")),
    }
    if est is not None:
        summary.update(
            collect_requests=est.requests,
            collect_prompt_tokens=est.prompt_tokens,
            collect_completion_tokens=est.completion_tokens,
            collect_usd_online=est.usd(),
            collect_usd_batch=est.usd(batch=True),
        )
    return summary


# It only describes (reads nothing, writes its estimate): it runs every time and leaves no completion marker.
STAGE = Stage("plan", run, marker=False, writes=("plan/plan.json", "plan/plan.md"))
