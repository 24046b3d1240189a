"""Dialogs → token ids and labels, cached on disk, split by dialog, packed or length-grouped into batches.

Two text formats (`train.format`):
- `baize`: the paper's `[|Human|] ... [|AI|] ...` transcript; the `[|Human|]` marker that closes an AI turn is
  part of the AI's target (it is how the model learns to stop), the human's text never is.
- `chat_template`: the tokenizer's own template; the target is each assistant message as the template renders it
  (content plus the end-of-turn token: `<|eot_id|>`, `<|im_end|>`, `</s>`).
Either way a row starts with the tokenizer's BOS exactly once when it puts one before text (Llama-3, Mistral; see
`data.bos_text`): added in front of the Baize text, and kept from a chat template that renders it itself.

Batches come in two shapes: padded rows with a 2D `attention_mask` (`train.packing=false`, batches grouped by
length so little is padding) or packed rows (`train.packing=true`) with `doc_ids` and `position_ids` that restart
at 0 for each dialog; the LightningModule turns `doc_ids` into a block-diagonal causal mask so no token attends
across dialogs.

Tokenized dialogs are an Arrow file (`datasets`, memory-mapped), written a chunk at a time as the dialogs are
tokenized and cached under `<cache_dir>/tokenized/<key>.arrow` (the key: the tokenizer's content, the settings and
the dialogs, hashed as they stream by), so 1M dialogs never sit in memory as Python lists, and a rerun maps the
file instead of tokenizing again. Packed rows are made when a batch asks for them, from the examples' indices.
Each chunk's segments go to the fast tokenizer in one call. Parallel tokenization did not pay on a 2-core machine
(1,000-1,500 dialogs/s either way): neither two processes over halves of the dialogs nor the tokenizer's own
threads, which runs switch off anyway (TOKENIZERS_PARALLELISM=false, conf/config.yaml).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from baize_exp.data import BAIZE_HUMAN, DialogFileError, baize_segments, bos_text, dialog_shape_error, to_chat_messages
from baize_exp.errors import UserError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

IGNORE = -100  # label value the loss skips
TOKENIZED_VERSION = "4"  # bump when tokenize_dialog or the cache's layout changes, so cached tokenizations are rebuilt
ENCODE_CHUNK = 1024  # dialogs tokenized (one tokenizer call) and written to the Arrow file at a time


# --- one dialog → segments → tokens ----------------------------------------------------------------------------

Segment = tuple[str, bool, bool]  # (text, is the AI's (a target), closes an exchange)


def _baize_segments(turns: list[dict]) -> list[Segment]:
    """The Baize text with the `[|Human|]` that closes each AI turn split off as a target of that turn."""
    out: list[Segment] = []
    prev_ai = False
    for text, is_ai in baize_segments(turns):
        if not is_ai and prev_ai and text.startswith(f"\n{BAIZE_HUMAN}"):
            out.append((f"\n{BAIZE_HUMAN}", True, True))
            text = text[len(f"\n{BAIZE_HUMAN}") :]
        elif is_ai and text == f"\n{BAIZE_HUMAN}":  # the closing marker after the last AI turn
            out.append((text, True, True))
            prev_ai = False
            continue
        out.append((text, is_ai, False))
        prev_ai = is_ai
    return out


def _chat_template_segments(turns: list[dict], tok: Any) -> list[Segment]:
    """Split the chat-template rendering into non-assistant and assistant pieces.

    The rendering of messages[:k] with the generation prompt must be a prefix of the rendering of
    messages[:k+1]; what lies between is assistant message k exactly as the template writes it.
    """
    if not getattr(tok, "chat_template", None):
        raise UserError("train.format=chat_template: the tokenizer has no chat template; use train.format=baize")
    msgs = to_chat_messages(turns)
    out: list[Segment] = []
    done = ""  # the rendering up to the end of the previous assistant message
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
        if not (full.startswith(prompt) and prompt.startswith(done)):
            raise UserError(
                "train.format=chat_template: this tokenizer's template does not render a conversation "
                "as a prefix of its continuation, so assistant tokens cannot be located; use "
                "train.format=baize"
            )
        out.append((prompt[len(done) :], False, False))
        out.append((full[len(prompt) :], True, True))
        done = full
    return out


def _segments(turns: list[dict], tok: Any, fmt: str) -> list[Segment] | None:
    """The dialog's segments, trailing human turns (no answer to learn) dropped; None if nothing is left."""
    while turns and turns[-1]["role"] != "ai":
        turns = turns[:-1]
    if not turns:
        return None
    if fmt == "baize":
        return _baize_segments(turns)
    if fmt == "chat_template":
        return _chat_template_segments(turns, tok)
    raise UserError(f"train.format={fmt!r}: one of baize, chat_template")


def _assemble(segs: list[Segment], pieces: list[list[int]], tok: Any, max_length: int, loss_on: str) -> dict | None:
    """Token ids and labels from the segments and their tokens (see `tokenize_dialog`)."""
    ids: list[int] = []
    labels: list[int] = []
    bos = bos_text(tok)
    if bos and not segs[0][0].startswith(bos):  # a template that renders BOS itself gets no second one
        ids.append(tok.bos_token_id)
        labels.append(IGNORE)
    exchange_end = 0  # length at the end of the last complete (human, ai) exchange
    for (_, is_ai, closes), piece in zip(segs, pieces, strict=True):
        if len(ids) + len(piece) > max_length:
            break
        ids += piece
        labels += piece if (is_ai or loss_on == "all") else [IGNORE] * len(piece)
        if closes:
            exchange_end = len(ids)
    if exchange_end == 0:
        return None
    ids, labels = ids[:exchange_end], labels[:exchange_end]
    if all(x == IGNORE for x in labels[1:]):  # the first label is never a target (nothing predicts it)
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_dialog(
    turns: list[dict], tok: Any, max_length: int, loss_on: str = "ai", fmt: str = "baize"
) -> dict | None:
    """Token ids and labels for one dialog.

    Labels cover only the AI's turns (with what closes them) when `loss_on="ai"`, every token when "all".
    Trailing human turns (no answer to learn) are dropped. A dialog longer than `max_length` keeps whole
    exchanges from the start rather than cutting a turn in half; None if not even the first exchange fits.
    """
    segs = _segments(turns, tok, fmt)
    if segs is None:
        return None
    return _assemble(
        segs, [tok(text, add_special_tokens=False).input_ids for text, _, _ in segs], tok, max_length, loss_on
    )


def tokenize_dialogs(
    dialogs: list[list[dict]], tok: Any, max_length: int, loss_on: str = "ai", fmt: str = "baize"
) -> list[dict | None]:
    """`tokenize_dialog` for many dialogs (their turns), every segment of them in one tokenizer call."""
    segs = [_segments(turns, tok, fmt) for turns in dialogs]
    texts = [text for ss in segs if ss for text, _, _ in ss]
    tokens = iter(tok(texts, add_special_tokens=False).input_ids if texts else [])
    out = []
    for ss in segs:
        if ss is None:
            out.append(None)
            continue
        pieces = [next(tokens) for _ in ss]
        out.append(_assemble(ss, pieces, tok, max_length, loss_on))
    return out


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of what the tokenizer does (vocab, merges, special tokens, chat template), not where it lives."""
    backend = getattr(tok, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(
        "\0".join(
            [
                spec,
                str(getattr(tok, "chat_template", "")),
                str(tok.bos_token),
                bos_text(tok),  # whether rows start with it
            ]
        ).encode()
    ).hexdigest()[:16]


def _features() -> datasets.Features:
    import datasets  # here, not at the top: ~85 MB that a run which does not train never needs

    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )


def encode_dialogs(
    dialogs: Iterable[dict],
    tok: Any,
    max_length: int,
    loss_on: str = "ai",
    fmt: str = "baize",
    cache: Path | None = None,
) -> tuple[datasets.Dataset, list[str]]:
    """Tokenize dialogs into a memory-mapped Arrow dataset (`input_ids`, `labels`, `length` per example), from the
    disk cache when it holds this exact input; return (examples, the ids of the dialogs dropped as too long).

    The cache key is the tokenizer's content, the format, loss_on, max_length and the dialogs themselves, hashed in
    a first pass over `dialogs` (so it must be iterable twice: a list, or a re-readable view of a file). Without a
    cache the file goes to a temporary dir, removed when the dataset is."""
    import datasets

    h = hashlib.sha256()
    for part in (TOKENIZED_VERSION, tokenizer_fingerprint(tok), fmt, loss_on, max_length):
        h.update(json.dumps(part).encode() + b"\0")
    for i, d in enumerate(dialogs):
        if err := dialog_shape_error(d):
            raise DialogFileError(f"dialog {d.get('id', i) if isinstance(d, dict) else i!r}: {err}")
        h.update(json.dumps(d["turns"], sort_keys=True, ensure_ascii=False).encode() + b"\0")
    key = h.hexdigest()[:24]
    if cache is not None:
        folder = Path(cache) / "tokenized"
        arrow, meta = folder / f"{key}.arrow", folder / f"{key}.json"
        if arrow.is_file() and meta.is_file():
            return datasets.Dataset.from_file(str(arrow)), json.loads(meta.read_text())["dropped"]
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="baize-tokenized-"))
        arrow, meta = folder / f"{key}.arrow", folder / f"{key}.json"
    tmp = arrow.with_name(f"{arrow.name}.{os.getpid()}.tmp")  # ranks may write at once; rename is atomic
    dropped = _write_arrow(dialogs, tok, max_length, loss_on, fmt, tmp)
    tmp.replace(arrow)
    tmp_meta = meta.with_name(f"{meta.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps({"dropped": dropped}))
    tmp_meta.replace(meta)  # written last: its presence says the Arrow file is whole
    ds = datasets.Dataset.from_file(str(arrow))
    if cache is None:
        weakref.finalize(ds, shutil.rmtree, folder, True)
    return ds, dropped


def _write_arrow(dialogs: Iterable[dict], tok: Any, max_length: int, loss_on: str, fmt: str, path: Path) -> list[str]:
    """Tokenize `dialogs` a chunk at a time into an Arrow stream file at `path`; return the dropped ids."""
    import pyarrow as pa

    schema = _features().arrow_schema
    dropped: list[str] = []
    chunk: list[tuple[int, dict]] = []

    def flush(writer: Any) -> None:
        ids, labels = [], []
        for (i, d), x in zip(
            chunk, tokenize_dialogs([d["turns"] for _, d in chunk], tok, max_length, loss_on, fmt), strict=True
        ):
            if x is None:
                dropped.append(str(d.get("id", i)))
            else:
                ids.append(x["input_ids"])
                labels.append(x["labels"])
        writer.write_batch(
            pa.record_batch(
                [
                    pa.array(ids, type=schema.field("input_ids").type),
                    pa.array(labels, type=schema.field("labels").type),
                    pa.array([len(x) for x in ids], type=pa.int32()),
                ],
                schema=schema,
            )
        )
        chunk.clear()

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for i, d in enumerate(dialogs):
            chunk.append((i, d))
            if len(chunk) == ENCODE_CHUNK:
                flush(writer)
        flush(writer)
    return dropped


# --- packing -----------------------------------------------------------------------------------------------------


def pack_examples(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (best-fit decreasing; deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (space - lengths[i], r))
    return rows


def pack_row(examples: list[dict]) -> dict:
    """Concatenate examples into one row: doc_ids 1..k, positions restarting at 0, no target across a boundary."""
    ids, labels, pos, docs = [], [], [], []
    for d, x in enumerate(examples, start=1):
        n = len(x["input_ids"])
        ids += x["input_ids"]
        labels += [IGNORE] + x["labels"][1:]  # the first token of a dialog is not predicted from the previous one
        pos += list(range(n))
        docs += [d] * n
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "doc_ids": docs}


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (no fixed 512-token padding).

    Packed rows (with `doc_ids`) keep `position_ids` and `doc_ids` (padding is doc 0) instead of an attention
    mask; the model builds the block-diagonal mask from them.
    """
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    out = {"input_ids": ids, "labels": labels}
    packed = "doc_ids" in batch[0]
    if packed:
        out["position_ids"] = torch.arange(width).repeat(len(batch), 1)
        out["doc_ids"] = torch.zeros((len(batch), width), dtype=torch.long)
    else:
        out["attention_mask"] = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        if packed:
            out["position_ids"][i, :n] = torch.tensor(b["position_ids"])
            out["doc_ids"][i, :n] = torch.tensor(b["doc_ids"])
        else:
            out["attention_mask"][i, :n] = 1
    return out


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask: token q sees token k iff k <= q and both belong to the same dialog.

    Padding (doc 0) sees only earlier padding, so no row is empty (an empty row gives NaN in softmax).
    """
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a batch."""
    return int((batch["doc_ids"] > 0).sum()) if "doc_ids" in batch else int(batch["attention_mask"].sum())


def attention_sq_lengths(batch: dict[str, torch.Tensor]) -> int:
    """Sum over dialogs of length squared (what causal attention costs), for the FLOP count."""
    if "doc_ids" in batch:
        return sum(int((torch.bincount(row)[1:] ** 2).sum()) for row in batch["doc_ids"].cpu())
    return int((batch["attention_mask"].sum(1).long() ** 2).sum())


# --- batching that can resume mid-epoch --------------------------------------------------------------------------


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose order depends only on (seed, epoch), sharded over ranks.

    `group_by_length` sorts chunks of 64 batches by length before cutting batches, so a batch holds similar
    lengths (little padding) while the order across chunks stays random. Every rank gets the same number of
    batches (the remainder is dropped; a too-small set is repeated). `resume_at(n)` makes the next iteration
    start after the first n batches of this rank, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        shuffle: bool,
        seed: int,
        group_by_length: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths, self.batch_size, self.shuffle, self.seed = lengths, batch_size, shuffle, seed
        self.group_by_length, self.rank, self.world_size = group_by_length, rank, world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.group_by_length:
            chunk = self.batch_size * 64
            order = [
                i for c in range(0, n, chunk) for i in sorted(order[c : c + chunk], key=lambda i: -self.lengths[i])
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        while len(batches) < self.world_size:
            batches += batches
        return batches

    def __len__(self) -> int:
        return max(-(-len(self.lengths) // self.batch_size), self.world_size) // self.world_size

    def __iter__(self):
        mine = self._all_batches()[self.rank :: self.world_size][: len(self)]
        skip, self._skip = self._skip, 0
        yield from mine[skip:]

    def resume_at(self, batches_done: int) -> None:
        """This rank has trained on `batches_done` batches since epoch 0: continue with the next one."""
        self.epoch, self._skip = divmod(batches_done, len(self))


class PackedRows(torch.utils.data.Dataset):
    """Packed rows made on demand: row r concatenates the examples `rows[r]` (`pack_row`); only the index lists are
    held (two int64 arrays), never the rows' tokens."""

    def __init__(self, examples: Any, rows: list[list[int]]):
        self.examples = examples
        self.members = np.fromiter((i for r in rows for i in r), np.int64, sum(len(r) for r in rows))
        self.starts = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=self.starts[1:])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def row(self, r: int) -> list[int]:
        return self.members[self.starts[r] : self.starts[r + 1]].tolist()

    def __getitem__(self, r: int) -> dict:
        return pack_row([self.examples[i] for i in self.row(r)])


def lengths_of(examples: Any) -> np.ndarray:
    """Each example's length, from the Arrow column (the tokens themselves are not read)."""
    if hasattr(examples, "data") and "length" in getattr(examples, "column_names", ()):  # a datasets.Dataset
        return examples.data.column("length").to_numpy()
    return np.array([len(x["input_ids"]) for x in examples], np.int64)


class DialogDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_dialogs: Iterable[dict],
        val_dialogs: Iterable[dict],
        tok: Any,
        max_length: int,
        batch_size: int,
        loss_on: str = "ai",
        seed: int = 0,
        fmt: str = "baize",
        packing: bool = False,
        cache: Path | None = None,
    ):
        super().__init__()
        self.tok, self.batch_size, self.seed, self.packing = tok, batch_size, seed, packing
        self.train_examples, dropped_train = encode_dialogs(train_dialogs, tok, max_length, loss_on, fmt, cache)
        self.val_examples, dropped_val = encode_dialogs(val_dialogs, tok, max_length, loss_on, fmt, cache)
        self.dropped_ids = dropped_train + dropped_val
        self.dropped = len(self.dropped_ids)
        if self.dropped:
            log.warning(
                "train: %d dialog(s) whose first exchange exceeds train.max_length=%d were left out: %s",
                self.dropped,
                max_length,
                self.dropped_ids[:10],
            )
        if not len(self.train_examples):
            raise UserError(
                f"train: no training dialog fits train.max_length={max_length} tokens (all "
                f"{len(dropped_train)} have a first exchange longer than that); raise train.max_length"
            )
        # Packed rows are planned once (deterministic); their order changes per epoch through the sampler.
        if packing:
            self.train_set = PackedRows(
                self.train_examples, pack_examples(lengths_of(self.train_examples).tolist(), max_length)
            )
        else:
            self.train_set = self.train_examples
        self.val_set = self.val_examples  # unpacked: val loss per dialog, comparable across packing settings

    def _loader(self, data: Any, shuffle: bool, rank: int, world_size: int) -> DataLoader:
        if isinstance(data, PackedRows):  # a row's length: its examples' together
            members = lengths_of(data.examples)[data.members]
            lengths = np.add.reduceat(members, data.starts[:-1]).tolist() if len(data) else []
        else:
            lengths = lengths_of(data).tolist()
        sampler = ResumableBatchSampler(
            lengths,
            self.batch_size,
            shuffle,
            self.seed,
            group_by_length=not self.packing or not shuffle,
            rank=rank,
            world_size=world_size,
        )
        # A generator of our own: the loader must not draw from the global RNG (exact resume depends on it).
        return DataLoader(
            data,
            batch_sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=lambda b: collate(b, self.tok.pad_token_id),
        )

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        return self._loader(self.train_set, True, t.global_rank if t else 0, t.world_size if t else 1)

    def val_dataloader(self) -> DataLoader | list:
        # every rank scores the whole (small) val set: the logged loss is exact, not an average of shards
        return self._loader(self.val_set, False, 0, 1) if len(self.val_set) else []

    @property
    def supervised_tokens(self) -> int:
        """Target tokens of the training examples (every label but the first that is not IGNORE)."""
        total = 0
        for batch in self.train_examples.data.column("labels").chunks:
            offsets = batch.offsets.to_numpy()
            targets = batch.flatten().to_numpy() != IGNORE
            total += int(targets.sum()) - int(targets[offsets[:-1] - offsets[0]].sum())
        return total
