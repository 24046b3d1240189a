"""Seeds, dialogs and formats: the data side of the pipeline, one module each.

seeds     the seed questions (shipped sets, seed files, real releases via `sources`) and the eval questions
dialogs   the dialog record: transcript parsing, dialog files and their rejects, the train/held-out split
formats   the Baize transcript format and the chat-template prompts, with the tokenizer's BOS once
sources   loaders for the paper's real releases and any HF dataset
quality   the quality filters over a collection
card      the collection's data card
export    dialogs for other tools (baize-export-dialogs)
"""

from baize_exp.data.dialogs import (
    DIALOG_REJECTS,
    REJECT_REASONS,
    DialogFileError,
    Parsed,
    dialog_reject,
    dialog_shape_error,
    dialogs_path,
    instruction_dialogs,
    load_dialogs,
    parse_transcript,
    split_dialogs,
    training_dialogs,
)
from baize_exp.data.formats import (
    BAIZE_AI,
    BAIZE_HEADER,
    BAIZE_HUMAN,
    baize_prompt,
    baize_segments,
    bos_text,
    generation_prompt,
    to_baize_text,
    to_chat_messages,
    with_bos,
)
from baize_exp.data.seeds import (
    DATA_DIR,
    EVAL_OVERLAP,
    EVAL_QUESTIONS,
    SEED_FIELDS,
    SEEDS_DIR,
    EvalLeakGuard,
    Seed,
    SeedFileError,
    load_eval_questions,
    load_seed_file,
    load_seeds,
    source_path,
)

__all__ = [
    "REJECT_REASONS",
    "Parsed",
    "parse_transcript",
    "DIALOG_REJECTS",
    "DialogFileError",
    "dialog_shape_error",
    "dialog_reject",
    "load_dialogs",
    "split_dialogs",
    "dialogs_path",
    "training_dialogs",
    "instruction_dialogs",
    "BAIZE_HEADER",
    "BAIZE_HUMAN",
    "BAIZE_AI",
    "baize_segments",
    "baize_prompt",
    "bos_text",
    "with_bos",
    "generation_prompt",
    "to_baize_text",
    "to_chat_messages",
    "DATA_DIR",
    "SEEDS_DIR",
    "EVAL_QUESTIONS",
    "Seed",
    "SeedFileError",
    "SEED_FIELDS",
    "load_seed_file",
    "source_path",
    "load_seeds",
    "load_eval_questions",
    "EVAL_OVERLAP",
    "EvalLeakGuard",
]
