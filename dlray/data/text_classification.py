"""Labelled texts for sequence classification: texts -> WordPiece tokens -> padded rows. No Ray here.

    data: {name: text_classification}     # docstrings of 8 standard-library packages, labelled by package
    data: {name: text_classification, path: reviews.jsonl, text_field: body, label_field: stars}
                                          # .jsonl / .json / .parquet / .csv files, a file or a folder

A sample is (input_ids, attention_mask, label): the first data.max_seq_len tokens of a text between
[CLS] and [SEP], padded with [PAD] to max_seq_len, the mask 1 on tokens and 0 on padding. Labels
may be strings or integers; class_names are their sorted values (integers in numeric order) and a
label is its index there. Texts are split by a hash of their text, as dlray.data.text's documents.

The tokenizer is `data.tokenizer` (a saved Hugging Face tokenizer: a pretrained base's own) or a
lower-cased WordPiece (BERT's scheme) with `data.vocab_size` tokens trained on the first FIT_ROWS
training texts, deterministically.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from dlray.data.rows import TEXT_SUFFIXES, read_rows, split_of
from dlray.data.spec import DataSource, Fitted, Listing

if TYPE_CHECKING:  # transformers loads where a tokenizer is made (dlray.data.text)
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from dlray.data.text import FIT_ROWS, TokenizedConfig, load_tokenizer

TABLE_SUFFIXES = TEXT_SUFFIXES - {".txt"}  # a .txt file has no label
# BERT's special tokens, ids 0-4 in a trained tokenizer.
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
# Packages of the standard library with 100 to 350 documented functions and classes each; their
# docstrings, labelled by package, are the bundled dataset.
STDLIB_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
PRIVATE_USE_PLANE = 0xF0000  # plane 15: code points no text assigns a meaning to, for train_tokenizer's stand-ins


class TextClassificationConfig(TokenizedConfig):
    name: Literal["text_classification"] = "text_classification"
    label_field: str = "label"  # the column holding each text's class (strings or integers)


def classifier_info(tokenizer: PreTrainedTokenizerBase, class_names: list[str], max_seq_len: int) -> dict:
    """What the bert family's build and the classify endpoint need."""
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "max_seq_len": max_seq_len, "class_names": class_names}


def list_rows(cfg: TextClassificationConfig, seed: int) -> Listing:
    if cfg.path:
        from dlray.data.rows import list_files

        filesystem, files = list_files(cfg.path, TABLE_SUFFIXES)
        return Listing(files=[f.path for f in files], filesystem=filesystem)
    return Listing(rows=[labelled_row(text, label, cfg, seed) for text, label in zip(*stdlib_docstrings())])


def read(filesystem, path: str, cfg: TextClassificationConfig, seed: int):
    """One file's labelled texts, each with its split; a row without a text or a label is named."""
    for number, text, label in labelled_rows(filesystem, path, "data.text_field", cfg.text_field, cfg.label_field):
        if not isinstance(text, str):
            raise ValueError(f"{path}, row {number}: data.text_field {cfg.text_field!r} holds {text!r}, not a text")
        yield labelled_row(text, label, cfg, seed)


def labelled_rows(filesystem, path: str, value_key: str, value_field: str, label_field: str):
    """(row number, value, label) of each row of one file; a missing column (`value_key` names the value's key) or a label that is
    not a string or an integer is named. Labelled texts' and labelled sequences' (dlray.data.sequences) reader."""
    fields = {value_key: value_field, "data.label_field": label_field}
    for number, row in enumerate(read_rows(filesystem, path, (value_field, label_field), f"{value_key} {value_field!r}"), 1):
        for key, column in fields.items():
            if column not in row:
                raise ValueError(f"{path}: {key} {column!r} is not a column; it has {sorted(row)}")
        label = row[label_field]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"{path}, row {number}: data.label_field {label_field!r} holds {label!r}; a label must be a string or an integer")
        yield number, row[value_field], label


def labelled_row(text: str, label, cfg: TextClassificationConfig, seed: int) -> dict:
    return {"text": text, "label": label, "split": split_of(text, cfg.val_fraction, cfg.test_fraction, seed)}


def fit(cfg: TextClassificationConfig, listing: Listing, sample: list[dict], classes: list | None) -> Fitted:
    """The class names (over every row's label) and the tokenizer (data.tokenizer, or trained on the first training texts)."""
    class_names = class_indices(classes)[0]
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer, "pad_token", "to pad texts with")
    else:
        tokenizer = train_tokenizer([row["text"] for row in sample], cfg.vocab_size)
    tokenizer.model_max_length = cfg.max_seq_len  # what `truncation=True` cuts to, in the exported tokenizer too
    return Fitted(info=classifier_info(tokenizer, class_names, cfg.max_seq_len), tokenizer=tokenizer, state=class_names)


def columns(cfg: TextClassificationConfig) -> tuple[str, ...]:
    return ("input_ids", "attention_mask", "label")


def preprocess(batch: dict, cfg: TextClassificationConfig, fitted: Fitted, augment: bool) -> dict:
    encoded = fitted.tokenizer(list(batch["text"]), padding="max_length", truncation=True, max_length=cfg.max_seq_len, return_tensors="np")
    _, labels = class_indices(list(batch["label"]), fitted.state)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "label": labels.numpy()}


def class_indices(labels: list, class_names: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """The class names (given, or the sorted labels: integers in numeric order) and each label's index among them."""
    if class_names is None:
        values = labels if all(isinstance(label, (int, np.integer)) for label in labels) else [str(label) for label in labels]
        class_names = [str(value) for value in sorted(set(values))]
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, torch.tensor([index[str(label)] for label in labels], dtype=torch.long)


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
    from transformers import PreTrainedTokenizerFast

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


SOURCE = DataSource(name="text_classification", config=TextClassificationConfig, kind="labelled text", list_rows=list_rows, fit=fit,
                    preprocess=preprocess, columns=columns, suffixes=TABLE_SUFFIXES, read=read, classes_from="label", fit_rows=FIT_ROWS)
