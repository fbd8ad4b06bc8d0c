"""Labelled texts for sequence classification: texts -> WordPiece tokens -> padded rows. No Ray here.

    data: {name: text_classification}     # docstrings of 8 standard-library packages, labelled by package
    data: {name: text_classification, path: reviews.jsonl, text_field: body, label_field: stars}
                                          # .jsonl / .json / .parquet / .csv files, a file or a folder

A sample is (input_ids, attention_mask, label): the first data.max_seq_len tokens of a text between
[CLS] and [SEP], padded with [PAD] to max_seq_len, the mask 1 on tokens and 0 on padding. Labels
may be strings or integers; class_names are their sorted values (integers in numeric order) and a
label is its index there. Texts are split stratified by label, the same way on every worker for
the same seed.

The tokenizer is `data.tokenizer` (a saved Hugging Face tokenizer: a pretrained base's own) or a
lower-cased WordPiece (BERT's scheme) with `data.vocab_size` tokens trained here on the training
split, deterministically, by every worker (seconds, as for dlray.data.text).
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dlray.data.images import split_indices
from dlray.data.text import FORMATS, load_rows, load_tokenizer

TABLE_FORMATS = {suffix: builder for suffix, builder in FORMATS.items() if builder != "text"}  # a .txt file has no label
# BERT's special tokens, ids 0-4 in a trained tokenizer.
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
# Packages of the standard library with 100 to 350 documented functions and classes each; their
# docstrings, labelled by package, are the bundled dataset.
STDLIB_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
PRIVATE_USE_PLANE = 0xF0000  # plane 15: code points no text assigns a meaning to, for train_tokenizer's stand-ins


@dataclass
class TextClassificationData:
    train: Dataset
    val: Dataset
    test: Dataset
    tokenizer: PreTrainedTokenizerBase
    class_names: list[str]
    max_seq_len: int

    @property
    def info(self) -> dict:
        return classifier_info(self.tokenizer, self.class_names, self.max_seq_len)


def classifier_info(tokenizer: PreTrainedTokenizerBase, class_names: list[str], max_seq_len: int) -> dict:
    """What the bert family's build and the classify endpoint need (for data in memory or streamed)."""
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "max_seq_len": max_seq_len, "class_names": class_names}


def build_text_classification_data(cfg, seed: int) -> TextClassificationData:
    texts, labels = load_labelled_texts(cfg.path, cfg.text_field, cfg.label_field) if cfg.path else stdlib_docstrings()
    class_names, targets = class_indices(labels)
    splits = split_indices(targets, cfg.val_fraction, cfg.test_fraction, seed)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer, "pad_token", "to pad texts with")
    else:
        tokenizer = train_tokenizer([texts[i] for i in splits[0]], cfg.vocab_size)
    tokenizer.model_max_length = cfg.max_seq_len  # what `truncation=True` cuts to, in the exported tokenizer too
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=cfg.max_seq_len, return_tensors="pt")
    train, val, test = (TensorDataset(encoded["input_ids"][idx], encoded["attention_mask"][idx], targets[idx]) for idx in splits)
    return TextClassificationData(train, val, test, tokenizer, class_names, cfg.max_seq_len)


def load_labelled_texts(path: str, text_field: str, label_field: str) -> tuple[list[str], list]:
    """Every row's text and label in a .jsonl / .json / .parquet / .csv file or a folder of them (recursively)."""
    rows = load_rows(path, (text_field, label_field), f"data.text_field {text_field!r}", TABLE_FORMATS)
    for key, column in {"data.text_field": text_field, "data.label_field": label_field}.items():
        if any(column not in row for row in rows):
            raise ValueError(f"{key} {column!r} is not a column of every file in {path}")
    texts, labels = [row[text_field] for row in rows], [row[label_field] for row in rows]
    row = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if row is not None:
        raise ValueError(f"data.text_field {text_field!r}: row {row} of {path} has no text, it holds {texts[row]!r}")
    row = next((i for i, label in enumerate(labels) if isinstance(label, bool) or not isinstance(label, (str, int))), None)
    if row is not None:
        raise ValueError(f"data.label_field {label_field!r}: row {row} of {path} holds {labels[row]!r}; a label must be a string or an integer")
    return texts, labels


def class_indices(labels: list) -> tuple[list[str], torch.Tensor]:
    """The sorted class names (integer labels in numeric order) and each label's index among them."""
    values = labels if all(isinstance(label, int) for label in labels) else [str(label) for label in labels]
    classes = sorted(set(values))
    index = {value: i for i, value in enumerate(classes)}
    return [str(value) for value in classes], torch.tensor([index[value] for value in values], dtype=torch.long)


def stdlib_docstrings() -> tuple[list[str], list[str]]:
    """The docstrings of every function and class in STDLIB_PACKAGES' sources (not their tests),
    labelled by package, in file and source order. Read with `ast`, so nothing is imported. A
    docstring found in two packages (an inherited one, copied) is dropped: it has no one label."""
    owners: dict[str, set[str]] = {}
    for package in STDLIB_PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for file in sorted(root.rglob("*.py")):
            if {"test", "tests"} & set(file.relative_to(root).parts):
                continue
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (doc := ast.get_docstring(node)):
                    owners.setdefault(doc, set()).add(package)
    texts = [text for text, packages in owners.items() if len(packages) == 1]
    return texts, [next(iter(owners[text])) for text in texts]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT's lower-cased WordPiece with [CLS] text [SEP] templates, deterministic.

    WordPiece training is BPE over words whose non-initial characters are marked ("##"), but the
    `tokenizers` WordPiece trainer numbers the marked characters in hash-map order, so two runs
    (two workers) disagree on token ids and, through tie-breaks, on pieces. Its plain BPE trainer
    is deterministic: it learns here from words whose non-initial characters are stand-ins from a
    private-use plane, and a learnt piece that starts with a stand-in becomes "##" + its characters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [[word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))] for text in texts]
    chars = {char for text in words for word in text for char in word}
    unused = (chr(code) for code in itertools.count(PRIVATE_USE_PLANE) if chr(code) not in chars)
    stand_in = dict(zip(sorted(chars), unused))
    original = {marked: char for char, marked in stand_in.items()}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False)
    bpe.train_from_iterator((" ".join(word[0] + "".join(map(stand_in.get, word[1:])) for word in text) for text in words), trainer)

    def piece(token: str) -> str:
        plain = "".join(original.get(char, char) for char in token)
        return "##" + plain if token[0] in original else plain

    wordpiece = Tokenizer(models.WordPiece({piece(token): i for token, i in bpe.get_vocab().items()}, unk_token=SPECIAL_TOKENS["unk_token"]))
    wordpiece.normalizer, wordpiece.pre_tokenizer, wordpiece.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    wordpiece.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, wordpiece.token_to_id(cls)), (sep, wordpiece.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece, **SPECIAL_TOKENS)
