"""Dialogs → token ids and labels, split by dialog, batched with per-batch padding."""

from __future__ import annotations

import random
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from baize_exp.data import baize_segments

IGNORE = -100  # label value the loss skips


def tokenize_dialog(turns: list[dict], tok: Any, max_length: int, loss_on: str = "ai") -> dict | None:
    """Token ids and labels for one dialog in the Baize format.

    Labels cover only the AI's text (and the marker that ends its turn) when `loss_on="ai"`, every token when
    "all". A dialog longer than `max_length` keeps whole exchanges from the start rather than cutting a turn in
    half; None if not even the first exchange fits.
    """
    ids: list[int] = []
    labels: list[int] = []
    if tok.bos_token_id is not None and tok.bos_token is not None and getattr(tok, "add_bos_token", False):
        ids.append(tok.bos_token_id)
        labels.append(IGNORE)
    segs = baize_segments(turns)
    exchange_end = 0  # length at the end of the last complete (human, ai) exchange
    for k, (text, is_ai) in enumerate(segs):
        piece = tok(text, add_special_tokens=False).input_ids
        if len(ids) + len(piece) > max_length:
            break
        ids += piece
        labels += piece if (is_ai or loss_on == "all") else [IGNORE] * len(piece)
        if is_ai:
            exchange_end = len(ids)
        if k == len(segs) - 1:
            exchange_end = len(ids)
    if exchange_end == 0:
        return None
    ids, labels = ids[:exchange_end], labels[:exchange_end]
    if all(x == IGNORE for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def split_dialogs(dialogs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split by dialog id (no dialog has turns on both sides), deterministic for a seed."""
    ids = sorted({d["id"] for d in dialogs})
    random.Random(seed).shuffle(ids)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(ids) >= 2:
        n_val = 1
    val_ids = set(ids[:n_val])
    return [d for d in dialogs if d["id"] not in val_ids], [d for d in dialogs if d["id"] in val_ids]


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (no fixed 512-token padding)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class DialogDataModule(pl.LightningDataModule):
    def __init__(self, train_dialogs: list[dict], val_dialogs: list[dict], tok: Any, max_length: int,
                 batch_size: int, loss_on: str = "ai", seed: int = 0):
        super().__init__()
        self.tok, self.batch_size, self.seed = tok, batch_size, seed
        enc = lambda ds: [x for x in (tokenize_dialog(d["turns"], tok, max_length, loss_on) for d in ds) if x]  # noqa: E731
        self.train_set, self.val_set = enc(train_dialogs), enc(val_dialogs)
        self.dropped = len(train_dialogs) + len(val_dialogs) - len(self.train_set) - len(self.val_set)
        if not self.train_set:
            raise ValueError(f"no training example fits train.max_length={max_length} tokens")

    def _loader(self, data: list[dict], shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, generator=g,
                          collate_fn=lambda b: collate(b, self.tok.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, False) if self.val_set else []

    @property
    def supervised_tokens(self) -> int:
        return sum(sum(1 for x in b["labels"] if x != IGNORE) for b in self.train_set)
