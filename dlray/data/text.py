"""Text for causal language modelling: documents -> tokens -> packed blocks, or conversations ->
chat template -> tokens trained on only where the assistant speaks. No Ray here.

    data: {name: text}                                    # Python's bundled help texts, no download
    data: {name: text, path: corpus/, text_field: body}   # .txt / .jsonl / .json / .parquet / .csv files
    data: {name: text, type: chat_template, path: chats.jsonl}   # rows of `messages`, or `prompt` + `response`

Every document ends with the EOS token (as in GPT-2's pretraining data, so a model learns where
text ends); the documents are concatenated and cut into windows of max_seq_len + 1 tokens that
overlap by one token, so every token but the first is a target exactly once. A sample is
(input_ids, labels) = (window[:-1], window[1:]): the labels are already shifted, and compute_loss
compares logits with them position by position (no second shift inside the model). Windows, not
documents, are split into train/val/test, the same way on every worker for the same seed.

The tokenizer is `data.tokenizer` (a saved Hugging Face tokenizer) or a byte-level BPE trained here
on the whole corpus: the splits are made of token windows, which exist only after tokenising, and
a tokenizer learns only a vocabulary from them. The `tokenizers` trainer is deterministic, and
training takes about as long as tokenising the corpus, which every worker does anyway, so each
worker trains its own instead of sharing a cache between processes (and nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dlray.data.images import split_indices
from dlray.data.sources import FORMATS

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 0, 1, 2 in a trained tokenizer


@dataclass
class TextData:
    train: Dataset
    val: Dataset
    test: Dataset
    tokenizer: PreTrainedTokenizerBase
    max_seq_len: int

    @property
    def info(self) -> dict:
        return language_model_info(self.tokenizer, self.max_seq_len)


def language_model_info(tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> dict:
    """What the gpt family's build needs (for data in memory or streamed)."""
    return {"vocab_size": len(tokenizer), "max_seq_len": max_seq_len,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


class TokenWindows(Dataset):
    """(input_ids, labels) pairs from rows of max_seq_len + 1 tokens."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        window = self.windows[i]
        return window[:-1], window[1:]


def build_text_data(cfg, seed: int) -> TextData:
    """Completion text (`data.type: completion`) packed into windows; dlray.data.chat builds chat_template data."""
    documents = load_documents(cfg.path, cfg.text_field) if cfg.path else bundled_documents()
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(documents, cfg.vocab_size)
    windows = pack(tokenize(tokenizer, documents), tokenizer.eos_token_id, cfg.max_seq_len)
    if len(windows) == 0:
        raise ValueError(f"the corpus ({cfg.path or 'bundled'}) has fewer than data.max_seq_len + 1 = {cfg.max_seq_len + 1} tokens")
    # One class: a plain shuffled split.
    train, val, test = split_indices(torch.zeros(len(windows), dtype=torch.long), cfg.val_fraction, cfg.test_fraction, seed)
    return TextData(TokenWindows(windows[train]), TokenWindows(windows[val]), TokenWindows(windows[test]), tokenizer, cfg.max_seq_len)


def bundled_documents() -> list[str]:
    """The ~80 help topics that ship with Python (`help('FORMATTING')`), about 0.5 MB of English."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def load_documents(path: str, text_field: str) -> list[str]:
    """Every non-empty text in a file or a folder (recursively); a .txt file is one document."""
    return [row[text_field] for row in load_rows(path, (text_field,), f"data.text_field {text_field!r}") if row[text_field]]


def load_rows(path: str, fields: tuple[str, ...], described: str, formats: dict[str, str] = FORMATS) -> list[dict]:
    """Every row of a file or a folder (recursively); each file needs at least one of `fields`
    (`described` says which in errors). A .txt file is one row, its whole text under every field.
    `formats` maps the suffixes read to their `datasets` builder."""
    import datasets

    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in formats) if root.is_dir() else [root]
    if not root.exists() or not files or files[0].suffix.lower() not in formats:
        raise FileNotFoundError(f"data.path {path!r} must be a {', '.join(formats)} file or a folder holding some")
    datasets.disable_progress_bars()  # every worker loads the same files: one bar each would flood the run's log
    rows = []
    for builder in sorted({formats[f.suffix.lower()] for f in files}):
        group = [str(f) for f in files if formats[f.suffix.lower()] == builder]
        options = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files=group, split="train", **options)
        if builder == "text":
            rows += [dict.fromkeys(fields, text) for text in dataset["text"]]
            continue
        if not set(fields) & set(dataset.column_names):
            raise ValueError(f"{described} is not a column of {group}; columns: {dataset.column_names}")
        rows += list(dataset)
    return rows


def load_tokenizer(directory: str, token: str = "eos_token", purpose: str = "to end documents with") -> PreTrainedTokenizerBase:
    """A saved tokenizer, which must have the special `token` the data needs."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if getattr(tokenizer, token) is None:
        raise ValueError(f"data.tokenizer {directory!r} has no {token} {purpose}")
    return tokenizer


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme: every string encodes, nothing is unknown), deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)


def tokenize(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the tokenizer's model_max_length are fine, they get cut into windows.
    return tokenizer(documents, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def pack(token_ids: list[list[int]], eos_token_id: int, max_seq_len: int) -> torch.Tensor:
    """Documents, each followed by EOS, as rows of max_seq_len + 1 tokens overlapping by one; the rest is dropped."""
    stream = torch.tensor([token for ids in token_ids for token in (*ids, eos_token_id)], dtype=torch.long)
    num_windows = max(len(stream) - 1, 0) // max_seq_len
    return stream[torch.arange(num_windows)[:, None] * max_seq_len + torch.arange(max_seq_len + 1)]
