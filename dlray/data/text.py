"""Text for causal language modelling: documents -> tokens -> packed windows, or conversations ->
chat template -> tokens trained on only where the assistant speaks (dlray.data.chat). No Ray here.

    data: {name: text}                                    # Python's bundled help texts, no download
    data: {name: text, path: corpus/, text_field: body}   # .txt / .jsonl / .json / .parquet / .csv files
    data: {name: text, type: chat_template, path: chats.jsonl}   # rows of `messages`, or `prompt` + `response`

Documents (conversations), not windows, are split into train/val/test, by a hash of their text,
before anything is tokenized: no window of a validation or test document is trained on. The
tokenizer is `data.tokenizer` (a saved Hugging Face tokenizer) or a byte-level BPE trained on the
first FIT_ROWS training documents only (the `tokenizers` trainer is deterministic).

Every document ends with the EOS token (as in GPT-2's pretraining data, so a model learns where text
ends); each batch of BATCH_ROWS documents is concatenated and cut into windows of max_seq_len + 1
tokens that overlap by one token, so every token but the first of a batch is a target exactly once.
A sample is (input_ids, labels) = (window[:-1], window[1:]): the labels are already shifted, and
compute_loss compares logits with them position by position (no second shift inside the model).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from dlray.data.rows import TEXT_SUFFIXES, read_rows, split_of
from dlray.data.spec import DataConfig, DataSource, Fitted, Listing

# transformers where a tokenizer is made: dlray.config imports every source, and each process that reads a
# config (Ray Train workers, Ray Data tasks, a digits run's too) would import it, ~2 s of CPU each.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 0, 1, 2 in a trained tokenizer
FIT_ROWS = 20_000  # training documents a tokenizer is trained on when data.tokenizer is not given
BATCH_ROWS = 256  # documents tokenized together, whose windows cross documents


class TokenizedConfig(DataConfig):
    """What the text sources share."""

    # A file, a folder (searched recursively), a glob (shards/*.parquet) or, streamed, a URI (s3://bucket/data).
    # None: the source's bundled texts.
    path: str | None = None
    text_field: str = "text"  # the column holding the text in .jsonl / .json / .parquet / .csv files
    max_seq_len: int = Field(128, ge=1)  # tokens per training sequence
    tokenizer: str | None = None  # a saved Hugging Face tokenizer directory; None: train one on the training rows
    vocab_size: int = Field(2048, ge=259)  # of the trained tokenizer: at least the 256 bytes and 3 special tokens

    @model_validator(mode="after")
    def _one_vocabulary(self):
        if self.tokenizer and self.vocab_size != type(self).model_fields["vocab_size"].default:
            raise ValueError("data.vocab_size sizes the tokenizer dlray trains, but data.tokenizer brings its own vocabulary: set only one of them")
        return self


class TextConfig(TokenizedConfig):
    name: Literal["text"] = "text"
    # completion: raw text, cut into packed windows (pretraining); chat_template: rows with `messages`
    # ([{role, content}]) or `prompt` and `response`, rendered with the chat template, and only the
    # assistant's tokens are trained on (Axolotl's dataset types of the same names).
    type: Literal["completion", "chat_template"] = "completion"
    # The tokenizer's own template when None; else a Jinja template or a name in dlray.data.chat.CHAT_TEMPLATES.
    # It is saved with the tokenizer, so the exported model's chat route renders what it was trained on.
    chat_template: str | None = None
    sample_packing: bool = False  # chat_template: several examples per sequence, each attending only to itself

    @model_validator(mode="after")
    def _chat_keys(self):
        if self.type == "completion" and (self.chat_template or self.sample_packing):
            key = "chat_template" if self.chat_template else "sample_packing"
            raise ValueError(f"data.{key} applies to data.type 'chat_template' (completion text is always packed into windows), got data.type 'completion'")
        return self


def language_model_info(tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> dict:
    """What the gpt family's build needs."""
    return {"vocab_size": len(tokenizer), "max_seq_len": max_seq_len,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


# --- rows ---------------------------------------------------------------------------------------


def list_rows(cfg: TextConfig, seed: int) -> Listing:
    """The bundled documents (or conversations) with their splits, or the files to read them from."""
    if cfg.path:
        from dlray.data.rows import list_files

        filesystem, files = list_files(cfg.path, TEXT_SUFFIXES)
        return Listing(files=[f.path for f in files], filesystem=filesystem)
    if cfg.type == "chat_template":
        from dlray.data.chat import bundled_conversations

        return Listing(rows=[conversation_row(messages, cfg, seed) for messages in bundled_conversations()])
    return Listing(rows=[document_row(text, cfg, seed) for text in bundled_documents()])


def read(filesystem, path: str, cfg: TextConfig, seed: int):
    """One file's documents (non-empty texts) or conversations, each with its split."""
    if cfg.type == "chat_template":
        from dlray.data.chat import ROW_FIELDS, to_messages

        for row in read_rows(filesystem, path, ROW_FIELDS, "`messages` (or `prompt` and `response`)"):
            yield conversation_row(to_messages(row), cfg, seed)
        return
    for row in read_rows(filesystem, path, (cfg.text_field,), f"data.text_field {cfg.text_field!r}"):
        if text := row.get(cfg.text_field):
            yield document_row(text, cfg, seed)


def document_row(text: str, cfg: TextConfig, seed: int) -> dict:
    return {"text": text, "split": split_of(text, cfg.val_fraction, cfg.test_fraction, seed)}


def conversation_row(messages: list[dict], cfg: TextConfig, seed: int) -> dict:
    """A conversation as JSON text: one string column (its split key too) in every batch format."""
    conversation = json.dumps(messages, sort_keys=True)
    return {"messages": conversation, "split": split_of(conversation, cfg.val_fraction, cfg.test_fraction, seed)}


def bundled_documents() -> list[str]:
    """The ~80 help topics that ship with Python (`help('FORMATTING')`), about 0.5 MB of English."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


# --- tokenizer ----------------------------------------------------------------------------------


def fit(cfg: TextConfig, listing: Listing, sample: list[dict], classes: list | None) -> Fitted:
    """The tokenizer: data.tokenizer, or trained on the first training rows; chat data's template set and required."""
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif cfg.type == "chat_template":
        tokenizer = train_tokenizer([m["content"] for row in sample for m in json.loads(row["messages"])], cfg.vocab_size)
    else:
        tokenizer = train_tokenizer([row["text"] for row in sample], cfg.vocab_size)
    if cfg.type == "chat_template":
        from dlray.data.chat import CHAT_TEMPLATES

        if cfg.chat_template:
            tokenizer.chat_template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
        if tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer ({cfg.tokenizer or 'trained here'}) has no chat template: set data.chat_template to "
                             f"one of {sorted(CHAT_TEMPLATES)} or to a Jinja template")
    return Fitted(info=language_model_info(tokenizer, cfg.max_seq_len), tokenizer=tokenizer)


def load_tokenizer(directory: str, token: str = "eos_token", purpose: str = "to end documents with") -> PreTrainedTokenizerBase:
    """A saved tokenizer, which must have the special `token` the data needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if getattr(tokenizer, token) is None:
        raise ValueError(f"data.tokenizer {directory!r} has no {token} {purpose}")
    return tokenizer


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme: every string encodes, nothing is unknown), deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)


# --- samples ------------------------------------------------------------------------------------


def columns(cfg: TextConfig) -> tuple[str, ...]:
    return ("input_ids", "position_ids", "labels") if cfg.type == "chat_template" and cfg.sample_packing else ("input_ids", "labels")


def preprocess(batch: dict, cfg: TextConfig, fitted: Fitted, augment: bool) -> dict:
    """Documents -> windows (tokenized, each ended by EOS, packed), or conversations -> chat samples."""
    tokenizer = fitted.tokenizer
    if cfg.type == "chat_template":
        from dlray.data.chat import chat_samples

        return chat_samples([json.loads(m) for m in batch["messages"]], tokenizer, cfg)
    packed = pack(tokenize(tokenizer, list(batch["text"])), tokenizer.eos_token_id, cfg.max_seq_len).numpy()
    return {"input_ids": packed[:, :-1], "labels": packed[:, 1:]}


def tokenize(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the tokenizer's model_max_length are fine, they get cut into windows.
    return tokenizer(documents, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def pack(token_ids: list[list[int]], eos_token_id: int, max_seq_len: int) -> torch.Tensor:
    """Documents, each followed by EOS, as rows of max_seq_len + 1 tokens overlapping by one; the rest is dropped."""
    stream = torch.tensor([token for ids in token_ids for token in (*ids, eos_token_id)], dtype=torch.long)
    num_windows = max(len(stream) - 1, 0) // max_seq_len
    return stream[torch.arange(num_windows)[:, None] * max_seq_len + torch.arange(max_seq_len + 1)]


SOURCE = DataSource(name="text", config=TextConfig, kind="text", list_rows=list_rows, fit=fit, preprocess=preprocess, columns=columns,
                    suffixes=TEXT_SUFFIXES, read=read, batch_rows=BATCH_ROWS, fit_rows=FIT_ROWS, one_sample_per_row=False)
