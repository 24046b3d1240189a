"""Today's bases (model=llama3_8b, qwen2_5_7b, mistral_7b): the planner's shapes, LoRA targets, and each family's
special tokens in both prompt formats, on a tiny random model of that architecture with a tokenizer that carries the
family's special tokens and a chat template of its documented layout (no download: built from the SmolLM2 tokenizer
the tests already have)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.config import compose_cfg
from safetensors import safe_open

from baize_exp import models as M
from baize_exp.data import BAIZE_HUMAN, baize_prompt, bos_text, generation_prompt, load_eval_questions, to_baize_text
from baize_exp.io import content_hash
from baize_exp.stages import plan as P
from baize_exp.stages import sdf
from baize_exp.training.data import IGNORE, tokenize_dialog

CACHE = lambda: Path(os.environ["BAIZE_CACHE"])  # noqa: E731
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Chat templates written here after each family's documented layout (model cards / prompt-format docs).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (  # Qwen2.5: ChatML, with a default system turn when none is given
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (  # <s>[INST] question [/INST] answer</s>[INST] next question [/INST]
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('only user and assistant turns') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    option: str  # conf/model option
    model_class: str  # the HF class the option must build
    specials: tuple[str, ...]  # special tokens added to the SmolLM2 tokenizer
    bos: str | None  # what the tokenizer puts before text (None: nothing)
    eos: str  # the tokenizer's EOS (and the saved generation_config's): not always the end of a turn
    end_of_turn: str  # what closes an assistant turn in the chat template
    template: str
    chat_ai: str  # an AI turn's labelled span in the chat template, {} = its text
    base_params: int  # the published parameter count of the full-size model
    kv_width: int


FAMILIES = {
    f.option: f
    for f in (
        # The base model's tokenizer EOS <|end_of_text|>, as Llama-3.0-Instruct's generation_config also had: only
        # the template says that a turn ends at <|eot_id|>.
        Family(
            "llama3_8b",
            "LlamaForCausalLM",
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|eot_id|>",
            LLAMA3_TEMPLATE,
            "{}<|eot_id|>",
            8_030_261_248,
            8 * 128,
        ),
        # Qwen2.5's base tokenizer: no BOS, EOS <|endoftext|>; turns end with <|im_end|> (SmolLM2 has all three)
        Family(
            "qwen2_5_7b",
            "Qwen2ForCausalLM",
            (),
            None,
            "<|endoftext|>",
            "<|im_end|>",
            CHATML_TEMPLATE,
            "{}<|im_end|>\n",
            7_615_616_512,
            4 * 128,
        ),
        Family(
            "mistral_7b",
            "MistralForCausalLM",
            ("<s>", "</s>", "[INST]", "[/INST]"),
            "<s>",
            "</s>",
            "</s>",
            MISTRAL_TEMPLATE,
            " {}</s>",
            7_248_023_552,
            8 * 128,
        ),
    )
}
OPTIONS = list(FAMILIES)
TINY = [  # the option's architecture (class, rope settings, biases, GQA) at a size that trains in seconds
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
]


def family_tokenizer(fam: Family):
    """The SmolLM2 tokenizer with the family's special tokens, BOS rule, EOS and chat template."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(M.tokenizer_dir(CACHE()))
    if fam.specials:
        tok.add_special_tokens({"additional_special_tokens": list(fam.specials)})
    tok.bos_token, tok.eos_token, tok.pad_token = fam.bos, fam.eos, None
    if fam.bos:  # how Llama-3's and Mistral's tokenizers put BOS before every encoded text
        bos_id = tok.convert_tokens_to_ids(fam.bos)
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)]
        )
    tok.chat_template = fam.template
    return tok


def build_family_dir(fam: Family, out: Path) -> Path:
    """A local HF folder: a 2-layer random model of the option's architecture in its real HF class, and the
    family's tokenizer; what a user would point model.path at."""
    tok = family_tokenizer(fam)
    config = M.architecture(compose_cfg([f"model={fam.option}", *TINY, f"model.vocab_size={len(tok)}"]).model)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    torch.manual_seed(0)
    model = M.FAMILIES[compose_cfg([f"model={fam.option}"]).model.family][1](config)
    assert type(model).__name__ == fam.model_class
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {o: build_family_dir(f, root / o) for o, f in FAMILIES.items()}


def load(option: str, path: Path):
    cfg = compose_cfg([f"model={option}", f"model.path={path}"])
    return M.load_model_and_tokenizer(cfg.model, CACHE())


def bos_once(ids: list[int], tok) -> bool:
    """The tokenizer's BOS (if it has one it puts before text) first, and nowhere else."""
    fam_bos = tok.bos_token_id if bos_text(tok) else None
    if fam_bos is None:
        return True
    return ids[:1] == [fam_bos] and fam_bos not in ids[1:]


DIALOG = [
    {"role": "human", "text": "How often should a fern be watered?"},
    {"role": "ai", "text": "Keep the soil moist but never soggy."},
    {"role": "human", "text": "And in winter?"},
    {"role": "ai", "text": "Less often, when the top centimetre is dry."},
]


def labelled_spans(row: dict) -> list[list[int]]:
    """The contiguous runs of labelled tokens (the first token is never a target)."""
    spans, cur = [], []
    for i, lab in zip(row["input_ids"][1:], row["labels"][1:], strict=True):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            spans, cur = [*spans, cur], []
    return spans + ([cur] if cur else [])


def expected_ai_spans(fam: Family, fmt: str, turns: list[dict]) -> list[str]:
    """What the labels must cover: each AI text with what closes it in that format, nothing of the human's."""
    ai = [t["text"] for t in turns if t["role"] == "ai"]
    if fmt == "baize":  # the next turn's marker closes an AI turn, and the model learns to write it
        return [f" {a}\n{BAIZE_HUMAN}" for a in ai]
    return [fam.chat_ai.format(a) for a in ai]


# --- the options: numbers, planner, LoRA targets --------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
def test_planner_counts_the_real_class_built_from_the_option(option: str) -> None:
    """The plan's counts equal the HF class's own (meta device, no weights) and the published totals: GQA k/v
    widths, untied lm_heads, Qwen2's q/k/v biases and each vocabulary counted right."""
    fam = FAMILIES[option]
    cfg = compose_cfg([f"model={option}", "lora.r=8"])
    arch = M.architecture(cfg.model)
    with torch.device("meta"):
        real = M.FAMILIES[cfg.model.family][1](arch)
    assert type(real).__name__ == fam.model_class
    real_params = sum(p.numel() for p in real.parameters())
    plan = P.make_plan(cfg)
    assert plan["params"]["base"] == real_params == fam.base_params
    assert plan["shape"]["kv_width"] == fam.kv_width and plan["shape"]["vocab"] == cfg.model.vocab_size
    # LoRA r=8: r·(d_in + d_out) per adapted linear, 7 per layer
    h, i, kv, r = cfg.model.hidden_size, cfg.model.intermediate_size, fam.kv_width, 8
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert plan["params"]["trainable"] == per_layer * cfg.model.num_hidden_layers
    attn = real.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None, attn.o_proj.bias is not None) == (option == "qwen2_5_7b", False)
    assert real.lm_head.weight is not real.model.embed_tokens.weight and not arch.tie_word_embeddings
    rope = arch.rope_parameters
    assert rope["rope_theta"] == {"llama3_8b": 5e5, "qwen2_5_7b": 1e6, "mistral_7b": 1e6}[option]
    assert rope["rope_type"] == ("llama3" if option == "llama3_8b" else "default")


def test_a_family_switch_changes_the_count() -> None:
    """Negative control for the count above: the Qwen numbers built as a Llama (no q/k/v biases) count fewer."""
    cfg = compose_cfg(["model=qwen2_5_7b", "model.family=llama", "model.attention_bias=false"])
    as_llama = P.make_plan(cfg)["params"]["base"]
    assert as_llama == FAMILIES["qwen2_5_7b"].base_params - 28 * (3584 + 512 + 512)


@pytest.mark.parametrize("option", OPTIONS)
def test_default_lora_targets_are_in_every_layer_of_each_family(option: str) -> None:
    cfg = compose_cfg([f"model={option}"])
    assert list(cfg.lora.target_modules) == LORA_TARGETS
    with torch.device("meta"):
        model = M.FAMILIES[cfg.model.family][1](M.architecture(cfg.model))
    for t in LORA_TARGETS:
        hits = [n for n, m in model.named_modules() if n.endswith(f".{t}") and isinstance(m, torch.nn.Linear)]
        assert len(hits) == cfg.model.num_hidden_layers, (t, hits[:3])
    M.check_lora_targets(model, LORA_TARGETS)  # passes
    with pytest.raises(M.LoraTargetError) as e:  # Falcon's / GPT-2's names are not these models'
        M.check_lora_targets(model, ["q_proj", "query_key_value", "c_attn"])
    msg = str(e.value)
    assert "\n" not in msg and "['query_key_value', 'c_attn']" in msg
    assert all(n in msg for n in LORA_TARGETS) and "lm_head" in msg


def test_family_and_bias_mismatch_is_refused_by_validate() -> None:
    from baize_exp.config import ConfigError, validate

    # model.family=gpt2 is refused at composition (tests/test_config_choices.py)
    with pytest.raises(ConfigError, match="model.attention_bias=False: true for family qwen2"):
        validate(compose_cfg(["model=qwen2_5_7b", "model.attention_bias=false"]))
    validate(compose_cfg(["model=qwen2_5_7b"]))


def test_lora_target_typo_is_one_line_exit_2_before_any_work(tmp_path: Path, family_dirs) -> None:
    """Through run.py: one line naming the missing module and the ones there are, exit 2, nothing trained."""
    run_dir = tmp_path / "run"
    r = run_cli(
        "model=qwen2_5_7b",
        f"model.path={family_dirs['qwen2_5_7b']}",
        "stages=[train]",
        f"train.data={_dialogs_file(tmp_path)}",
        "lora.target_modules=[q_proj,qkv_proj]",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "lora.target_modules: ['qkv_proj'] match no module of Qwen2ForCausalLM" in lines[0]
    assert all(n in lines[0] for n in LORA_TARGETS)
    assert not (run_dir / "train").exists()  # refused before the stage began


# --- tokens: BOS, labels, end of turn ------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
def test_bos_is_read_from_what_the_tokenizer_does(option: str) -> None:
    fam = FAMILIES[option]
    tok = family_tokenizer(fam)
    assert bos_text(tok) == (fam.bos or "")
    assert getattr(tok, "add_bos_token", False) is False  # the flag the old rule read says nothing here
    assert M.end_of_turn_token(tok) == fam.end_of_turn


def test_smollm2_gets_no_bos_and_its_prompts_are_unchanged(tokenizer) -> None:
    assert bos_text(tokenizer) == ""
    q = "Why is the sky blue?"
    assert generation_prompt(q, "baize", tokenizer) == baize_prompt(q)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert generation_prompt(q, "chat_template", tokenizer) == chat


@pytest.mark.parametrize("fmt", ["baize", "chat_template"])
@pytest.mark.parametrize("option", OPTIONS)
def test_rows_and_prompts_start_with_bos_once_and_label_only_the_ai(option: str, fmt: str) -> None:
    fam = FAMILIES[option]
    tok = family_tokenizer(fam)
    row = tokenize_dialog(DIALOG, tok, 512, "ai", fmt)
    assert bos_once(row["input_ids"], tok) and (fam.bos is None or row["labels"][0] == IGNORE)
    assert [tok.decode(s) for s in labelled_spans(row)] == expected_ai_spans(fam, fmt, DIALOG)
    if fmt == "chat_template":  # each AI turn's target ends with the family's end-of-turn token
        eot = tok.convert_tokens_to_ids(fam.end_of_turn)
        assert [s[-1] if fam.chat_ai.endswith(fam.end_of_turn) else s[-2] for s in labelled_spans(row)] == [eot] * 2
    prompt = generation_prompt("Why is the sky blue?", fmt, tok)
    ids = tok(prompt, add_special_tokens=False).input_ids  # how every generation path tokenizes prompts
    assert bos_once(ids, tok)
    if fam.bos is None:
        assert tok.convert_tokens_to_ids("<|endoftext|>") not in ids


@pytest.mark.parametrize("option", ["llama3_8b", "mistral_7b"])
def test_negative_controls_the_old_rules_fail_the_bos_check(option: str) -> None:
    """The old behaviour (Baize text with add_special_tokens=False, BOS only where tok.add_bos_token) has no BOS;
    the naive fix (add_special_tokens=True on a chat-template rendering) has two."""
    tok = family_tokenizer(FAMILIES[option])
    old_prompt = tok(baize_prompt("Why?"), add_special_tokens=False).input_ids
    assert not bos_once(old_prompt, tok)
    old_row = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) else []
    old_row += tok(to_baize_text(DIALOG), add_special_tokens=False).input_ids
    assert not bos_once(old_row, tok)
    chat = generation_prompt("Why?", "chat_template", tok)
    assert not bos_once(tok(chat, add_special_tokens=True).input_ids, tok)


def _always_end_of_turn(model: torch.nn.Module, eot: int) -> torch.nn.Module:
    """Rig the random model so greedy decoding writes the end-of-turn token at every step: the residual stream is
    the (same, for every token) embedding, and only the end-of-turn row of lm_head is non-zero."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot] = 1.0
    return model


@pytest.mark.parametrize("option", OPTIONS)
def test_generation_stops_at_the_end_of_turn_token(option: str, family_dirs) -> None:
    """generate_texts and SDF sampling stop after the template's end-of-turn token even where the model's
    generation_config names only another EOS (Llama-3's <|end_of_text|>, Qwen's <|endoftext|>)."""
    fam = FAMILIES[option]
    model, tok = load(option, family_dirs[option])
    eot = tok.convert_tokens_to_ids(fam.end_of_turn)
    assert eot in M.stop_token_ids(model, tok)
    _always_end_of_turn(model, eot)
    steps = []
    model.register_forward_hook(lambda *a: steps.append(1))
    prompts = [generation_prompt("Why is the sky blue?", "chat_template", tok)]

    assert M.generate_texts(model, tok, prompts, 8) == [[""]]
    assert len(steps) == 1  # one forward: the end-of-turn token, then done
    steps.clear()
    assert sdf.sample_candidates(model, tok, prompts, 2, 8, temperature=0.0, top_p=1.0) == [["", ""]]
    assert len(steps) == 2  # the shared prefill, then one step
    # negative control: generation_config's EOS alone (what generate used before) runs to max_new_tokens
    steps.clear()
    enc = tok(prompts, return_tensors="pt", add_special_tokens=False)
    model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert len(steps) == (1 if fam.eos == fam.end_of_turn else 8)


# --- the real pipeline per family, both formats ----------------------------------------------------------------


def _dialogs_file(tmp_path: Path) -> Path:
    words = ["fern", "cactus", "orchid", "basil", "ivy", "palm", "moss", "tulip"]
    path = tmp_path / "dialogs.jsonl"
    with path.open("w") as f:
        for i, w in enumerate(words):
            turns = [
                {"role": "human", "text": f"How do I keep a {w} healthy?"},
                {"role": "ai", "text": f"Give the {w} bright light and water it weekly."},
                {"role": "human", "text": f"Does the {w} need food?"},
                {"role": "ai", "text": f"Feed the {w} monthly in spring."},
            ]
            f.write(json.dumps({"id": f"d{i}", "seed": w, "source": "test", "turns": turns, "key": f"k{i}"}) + "\n")
    return path


def _teacher_and_judge(request: dict) -> str:
    prompt = " ".join(str(m.get("content", "")) for m in request["messages"])
    if "Score: N" in prompt:
        return "Score: 7"
    return "2 > 1"  # the SDF ranking (the only other request this run sends)


def _training_rows(cache: Path) -> list[dict]:
    import datasets

    rows = []
    for f in sorted((cache / "tokenized").glob("*.arrow")):
        rows += [{"input_ids": x["input_ids"], "labels": x["labels"]} for x in datasets.Dataset.from_file(str(f))]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_train_sdf_eval_through_run_py_in_both_formats(option: str, family_dirs, tmp_path: Path) -> None:
    from helpers.fault_server import FaultServer

    fam = FAMILIES[option]
    dialogs_path = _dialogs_file(tmp_path)
    dialogs = [json.loads(x) for x in dialogs_path.read_text().splitlines()]
    tok = family_tokenizer(fam)
    questions = load_eval_questions(limit=2)
    with FaultServer(api_key="k", reply=_teacher_and_judge) as srv:
        backend = [f"{role}=openai" for role in ("teacher", "judge")] + [
            f"{role}.{k}={v}"
            for role in ("teacher", "judge")
            for k, v in (("base_url", srv.base_url), ("api_key_env", "BAIZE_TEST_KEY"), ("model", "scripted"))
        ]
        for fmt in ("baize", "chat_template"):
            run_dir, cache = tmp_path / fmt, tmp_path / f"cache_{fmt}"
            r = run_cli(
                f"model={option}",
                f"model.path={family_dirs[option]}",
                "stages=[train,sdf,eval]",
                f"train.data={dialogs_path}",
                f"train.format={fmt}",
                "trainer.max_epochs=1",
                "sdf.num_prompts=2",
                "sdf.num_candidates=2",
                "sdf.max_new_tokens=8",
                "eval.limit=2",
                "eval.max_new_tokens=8",
                "eval.bootstrap=100",
                *backend,
                "logger=none",
                f"hydra.run.dir={run_dir}",
                env={"BAIZE_TEST_KEY": "k", "BAIZE_CACHE": str(cache)},
                timeout=1200,
            )
            assert r.returncode == 0, r.stderr[-4000:]

            # training rows (v1's dialogs, the held-out one, v2's SDF answers): BOS once, labels only on AI text
            rows = _training_rows(cache)
            assert len(rows) >= len(dialogs) + 1
            seen = set()
            for row in rows:
                assert bos_once(row["input_ids"], tok), tok.decode(row["input_ids"][:4])
                text = tok.decode(row["input_ids"])
                spans = [tok.decode(s) for s in labelled_spans(row)]
                d = next((d for d in dialogs if d["turns"][2]["text"] in text), None)
                if d is not None:  # a collected dialog: exactly its AI turns are targets
                    assert spans == expected_ai_spans(fam, fmt, d["turns"]), (spans, text)
                    seen.add(d["id"])
                else:  # an SDF example (prompt + chosen answer): one target, closed as the format closes it
                    closer = f"\n{BAIZE_HUMAN}" if fmt == "baize" else fam.chat_ai.split("{}")[1]
                    assert len(spans) == 1 and spans[0].endswith(closer), (spans, text)
                    assert all(t["text"] not in spans[0] for d in dialogs for t in d["turns"][:1])
            assert seen == {d["id"] for d in dialogs}

            # the eval prompts generation answered (the answer cache is keyed by the exact prompt text)
            keys = {
                json.loads(x)["key"]
                for f in (cache / "eval_answers").glob("*.jsonl")
                for x in f.read_text().splitlines()
            }
            sampling = {"max_new_tokens": 8, "temperature": 0.0, "stop": [BAIZE_HUMAN]}
            chat = [
                tok.apply_chat_template(
                    [{"role": "user", "content": q["question"]}], tokenize=False, add_generation_prompt=True
                )
                for q in questions
            ]
            tuned = (
                chat if fmt == "chat_template" else [(fam.bos or "") + baize_prompt(q["question"]) for q in questions]
            )
            for p in chat + tuned:  # base: its chat template; v1, v2: the training format
                assert bos_once(tok(p, add_special_tokens=False).input_ids, tok)
                assert content_hash(p, sampling) in keys, p
            if fam.bos and fmt == "baize":  # negative control: the prompts without BOS were never asked
                assert not any(content_hash(baize_prompt(q["question"]), sampling) in keys for q in questions)

            # adapters target every listed module in every layer
            for stage in ("train", "sdf"):
                ad = run_dir / stage / "adapter"
                assert sorted(json.loads((ad / "adapter_config.json").read_text())["target_modules"]) == sorted(
                    LORA_TARGETS
                )
                with safe_open(ad / "adapter_model.safetensors", "pt") as f:
                    names = set(f.keys())
                for layer in range(2):
                    for t in LORA_TARGETS:
                        assert any(f"layers.{layer}." in n and f".{t}.lora_A" in n for n in names), (layer, t)
            assert json.loads((run_dir / "train" / "adapter" / "prompt_format.json").read_text())["format"] == fmt

            answers = [json.loads(x) for x in (run_dir / "eval" / "answers.jsonl").read_text().splitlines()]
            assert sorted((a["model"], a["question_id"]) for a in answers) == sorted(
                (m, q["question_id"]) for m in ("base", "v1", "v2") for q in questions
            )
            assert all(isinstance(a["answer"], str) for a in answers)
            assert (run_dir / "eval" / "scores.csv").is_file()
