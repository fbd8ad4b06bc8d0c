"""Preference data for DPO, ORPO and KTO (`finetune.objective`), in TRL's formats. No Ray here.

    data: {name: preference}                                            # a generated set from Python's help topics
    data: {name: preference, path: pairs.jsonl}                         # rows of prompt, chosen, rejected
    data: {name: preference, type: unpaired_preference, path: kto.jsonl}  # rows of prompt, completion, label (KTO)

A row's fields are strings (TRL's "standard" form: the completion gets the EOS token) or lists of
messages (its "conversational" form: the prompt's messages, and the completion's assistant turn,
rendered with the tokenizer's chat template or `data.chat_template`). The prompt and each completion
are tokenised apart and joined; only the completion's tokens are trained on (every other label is
IGNORE_INDEX). A pair whose prompt plus longer completion exceeds data.max_seq_len + 1 tokens is cut as
TRL cuts it: first the prompt, keeping its last data.max_prompt_len tokens, then the completions; each
preprocessing batch says how many rows it cut. A row missing a field, or with a field of the wrong
type, is an error naming its file and line.

A paired sample is (chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels), each
padded on the right to max_seq_len. An unpaired (KTO) sample is (input_ids, labels, kl_input_ids,
kl_labels, label): the kl_ sequence is the row's prompt with the next row's completion (the next
within its preprocessing batch), the mismatched pair from which KTO estimates its KL term, as TRL
builds it. Pairs are split into train/val/test by a hash of their prompt, so one prompt's pairs
stay in one split.
"""

from __future__ import annotations

import json
import random
import zlib
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from dlray.data.rows import read_rows, split_of
from dlray.data.spec import DataSource, Fitted, Listing
from dlray.data.text import TokenizedConfig, language_model_info, load_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # as dlray.data.chat: the label of a position not trained on
SUFFIXES = frozenset({".jsonl", ".json", ".parquet", ".csv"})


class PreferenceConfig(TokenizedConfig):
    name: Literal["preference"] = "preference"
    # preference: prompt, chosen, rejected (DPO, ORPO); unpaired_preference: prompt, completion, label (KTO). TRL's names.
    type: Literal["preference", "unpaired_preference"] = "preference"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    completion_field: str = "completion"
    label_field: str = "label"  # true: the completion is desirable
    # Of a pair that does not fit in max_seq_len + 1 tokens, the prompt keeps at most its last this many
    # (TRL's max_prompt_length, truncation_mode keep_end). None: half of max_seq_len.
    max_prompt_len: int | None = Field(None, ge=1)
    # For conversational rows: the tokenizer's own template when None; else a Jinja template or a name in
    # dlray.data.chat.CHAT_TEMPLATES, saved with the tokenizer (the exported model's chat route renders alike).
    chat_template: str | None = None

    @model_validator(mode="after")
    def _own_keys(self):
        if self.text_field != "text":
            raise ValueError("data.text_field names a text column; preference rows name theirs with data.prompt_field, data.chosen_field, "
                             "data.rejected_field (data.type 'preference') or data.completion_field, data.label_field ('unpaired_preference')")
        if self.max_prompt_len is not None and self.max_prompt_len >= self.max_seq_len:
            raise ValueError(f"data.max_prompt_len must be below data.max_seq_len ({self.max_seq_len}), got {self.max_prompt_len}")
        return self

    def fields(self) -> tuple[str, ...]:
        if self.type == "preference":
            return self.prompt_field, self.chosen_field, self.rejected_field
        return self.prompt_field, self.completion_field, self.label_field


# --- rows ---------------------------------------------------------------------------------------


def list_rows(cfg: PreferenceConfig, seed: int) -> Listing:
    if cfg.path:
        from dlray.data.rows import list_files

        filesystem, files = list_files(cfg.path, SUFFIXES)
        return Listing(files=[f.path for f in files], filesystem=filesystem)
    pairs = bundled_pairs()
    if cfg.type == "unpaired_preference":
        return Listing(rows=[stored({"prompt": p, "completion": c, "label": label}, ("prompt", "completion", "label"), cfg, seed)
                             for p, chosen, rejected in pairs for c, label in ((chosen, True), (rejected, False))])
    return Listing(rows=[stored({"prompt": p, "chosen": c, "rejected": r}, ("prompt", "chosen", "rejected"), cfg, seed) for p, c, r in pairs])


def read(filesystem, path: str, cfg: PreferenceConfig, seed: int):
    fields = cfg.fields()
    described = ", ".join(f"`{field}`" for field in fields)
    for row in read_rows(filesystem, path, fields, described, validate=lambda row: checked_row(row, cfg)):
        yield stored(row, fields, cfg, seed)


def checked_row(row: dict, cfg: PreferenceConfig) -> None:
    """Raises ValueError saying what is wrong with a row (read_rows adds its file and line)."""
    fields = cfg.fields()
    # An empty completion has nothing to prefer (a .csv cell left empty reads as ""); an empty prompt is a prompt.
    missing = [field for field in fields if row.get(field) is None or (field != cfg.prompt_field and row[field] == "")]
    if missing:
        raise ValueError(f"a data.type {cfg.type!r} row needs {', '.join(map(repr, fields))}; it lacks {', '.join(map(repr, missing))}")
    texts = fields if cfg.type == "preference" else fields[:2]
    forms = {field: "text" if isinstance(row[field], str) else "messages" if is_messages(row[field]) else None for field in texts}
    if None in forms.values() or len(set(forms.values())) > 1:
        raise ValueError(f"{', '.join(map(repr, texts))} must all be strings or all be lists of {{role, content}} messages; "
                         f"got {', '.join(f'{field!r}: {type(row[field]).__name__}' for field in texts)}")
    if cfg.type == "unpaired_preference" and row[cfg.label_field] not in (True, False, 0, 1):
        raise ValueError(f"{cfg.label_field!r} must be true or false, got {row[cfg.label_field]!r}")


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def stored(row: dict, fields: tuple[str, ...], cfg: PreferenceConfig, seed: int) -> dict:
    """A row under the names preprocess reads, texts (or messages) as JSON strings: string columns in every
    batch format. The split is a hash of the prompt."""
    prompt, first, second = (row[field] for field in fields)
    out = {"prompt": json.dumps(prompt)}
    if cfg.type == "preference":
        out |= {"chosen": json.dumps(first), "rejected": json.dumps(second)}
    else:
        out |= {"completion": json.dumps(first), "label": int(bool(second))}
    return out | {"split": split_of(out["prompt"], cfg.val_fraction, cfg.test_fraction, seed)}


def bundled_pairs() -> list[tuple[list[dict], list[dict], list[dict]]]:
    """One conversational pair per Python help topic (dlray.data.chat.bundled_conversations): the
    question; chosen, the topic's first paragraph; rejected, the same words in a shuffled order (seeded
    by the question). Chosen is the better answer by construction, and a language model of English
    prose scores it higher: the margin a preference-tuned model widens (benchmarks/results.md)."""
    from dlray.data.chat import bundled_conversations

    pairs = []
    for (question, answer) in bundled_conversations():
        words = answer["content"].split()
        random.Random(zlib.crc32(question["content"].encode())).shuffle(words)
        pairs.append(([question], [answer], [{"role": "assistant", "content": " ".join(words)}]))
    return pairs


# --- tokenizer ----------------------------------------------------------------------------------


def fit(cfg: PreferenceConfig, listing: Listing, sample: list[dict], classes: list | None) -> Fitted:
    """The tokenizer (data.tokenizer, or trained on the sample's texts) with the chat template that conversational rows need."""
    rows = [json.loads(row[key]) for row in sample for key in ("prompt", "chosen", "rejected", "completion") if key in row]
    conversational = any(isinstance(value, list) for value in rows)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer, purpose="to end completions with")
    else:
        tokenizer = train_tokenizer([m["content"] if conversational else m for value in rows for m in (value if conversational else [value])],
                                    cfg.vocab_size)
    if cfg.chat_template:
        from dlray.data.chat import CHAT_TEMPLATES

        tokenizer.chat_template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
    if conversational and tokenizer.chat_template is None:
        from dlray.data.chat import CHAT_TEMPLATES

        raise ValueError(f"conversational preference rows need a chat template, and the tokenizer ({cfg.tokenizer or 'trained here'}) has "
                         f"none: set data.chat_template to one of {sorted(CHAT_TEMPLATES)} or to a Jinja template")
    return Fitted(info=language_model_info(tokenizer, cfg.max_seq_len), tokenizer=tokenizer)


# --- samples ------------------------------------------------------------------------------------


def columns(cfg: PreferenceConfig) -> tuple[str, ...]:
    if cfg.type == "preference":
        return "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"
    return "input_ids", "labels", "kl_input_ids", "kl_labels", "label"


def preprocess(batch: dict, cfg: PreferenceConfig, fitted: Fitted, augment: bool) -> dict:
    """Rows -> padded (input_ids, labels) per completion, trained on the completion only; prints how many rows were cut."""
    tokenizer = fitted.tokenizer
    prompts = [json.loads(p) for p in batch["prompt"]]
    if cfg.type == "preference":
        completions = [[json.loads(c) for c in batch["chosen"]], [json.loads(r) for r in batch["rejected"]]]
    else:
        completion = [json.loads(c) for c in batch["completion"]]
        completions = [completion, completion[1:] + completion[:1]]  # the kl_ sequences: each prompt with the next row's completion
    cap, max_prompt = cfg.max_seq_len + 1, cfg.max_prompt_len or cfg.max_seq_len // 2
    samples: list[list[tuple[list[int], list[int]]]] = [[], []]
    cut = 0
    for i, prompt in enumerate(prompts):
        prompt_ids, *completion_ids = tokenize_row(tokenizer, prompt, [c[i] for c in completions])
        prompt_ids, completion_ids, was_cut = truncate(prompt_ids, completion_ids, cap, max_prompt)
        cut += was_cut
        for kept, ids in zip(samples, completion_ids):
            kept.append((prompt_ids, ids))
    if cut:
        print(f"[dlray] data: {cut} of {len(prompts)} preference rows cut to data.max_seq_len + 1 = {cap} tokens "
              f"(the prompt first, to its last {max_prompt} tokens; then the completions)", flush=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    (first_ids, first_labels), (second_ids, second_labels) = (padded(kept, pad_id, cfg.max_seq_len) for kept in samples)
    if cfg.type == "preference":
        return {"chosen_input_ids": first_ids, "chosen_labels": first_labels, "rejected_input_ids": second_ids, "rejected_labels": second_labels}
    return {"input_ids": first_ids, "labels": first_labels, "kl_input_ids": second_ids, "kl_labels": second_labels,
            "label": np.asarray(batch["label"], dtype=np.float32)}


def tokenize_row(tokenizer: PreTrainedTokenizerBase, prompt, completions: list) -> list[list[int]]:
    """The token ids of the prompt and of each completion (rendered with the chat template for messages)."""
    if isinstance(prompt, list):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts = []
        for completion in completions:
            whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            if not whole.startswith(prompt_text):
                raise ValueError("the chat template renders the prompt as something other than the beginning of the prompt and its "
                                 "completion, so the completion cannot be told apart: use another data.chat_template")
            texts.append(whole[len(prompt_text):])
    else:
        prompt_text, texts = prompt, [completion + tokenizer.eos_token for completion in completions]
    encoded = tokenizer([prompt_text, *texts], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return [list(ids) for ids in encoded]


def truncate(prompt: list[int], completions: list[list[int]], cap: int, max_prompt: int) -> tuple[list[int], list[list[int]], bool]:
    """TRL's truncation (keep_end) to `cap` tokens: a prompt too long for its longest completion keeps its last
    `max_prompt` tokens; completions still too long keep their first tokens. Whether anything was cut."""
    longest = max(map(len, completions))
    if len(prompt) + longest <= cap:
        return prompt, completions, False
    prompt = prompt[-max_prompt:]
    if len(prompt) + longest > cap:
        completions = [ids[: cap - len(prompt)] for ids in completions]
    return prompt, completions, True


def padded(sequences: list[tuple[list[int], list[int]]], pad_id: int, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), each [rows, max_seq_len]: prompt + completion shifted as in dlray.data.chat (a position's label
    is the next token), labelled only where that token is the completion's."""
    input_ids = torch.full((len(sequences), max_seq_len), pad_id)
    labels = torch.full((len(sequences), max_seq_len), IGNORE_INDEX)
    for row, (prompt, completion) in enumerate(sequences):
        ids = torch.tensor(prompt + completion)
        start = max(len(prompt), 1)  # with an empty prompt, the first token has nothing to be predicted from
        input_ids[row, : len(ids) - 1] = ids[:-1]
        labels[row, start - 1 : len(ids) - 1] = ids[start:]
    return input_ids.numpy(), labels.numpy()


SOURCE = DataSource(name="preference", config=PreferenceConfig, kind="preference", list_rows=list_rows, fit=fit, preprocess=preprocess,
                    columns=columns, suffixes=SUFFIXES, read=read, batch_rows=256, fit_rows=20_000)
