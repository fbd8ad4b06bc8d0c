"""Conversations for supervised fine-tuning (`data.type: chat_template`). No Ray here.

Each row is `messages` ([{"role": "system" | "user" | "assistant", "content": ...}, ...]) or a
`prompt` and a `response` (one user turn, one assistant turn). A conversation is rendered to text
with the tokenizer's chat template (or `data.chat_template`, which is then saved with the tokenizer,
so the exported model's chat route renders prompts the way it was trained), tokenised, and cut to
data.max_seq_len + 1 tokens. Only what the assistant says, up to and including the end of its
turn, is trained on: every other label is IGNORE_INDEX. To find the assistant's text in the
rendered conversation, the conversation is rendered up to each assistant turn; a template that
renders a shorter conversation as anything but a prefix of the longer one is refused.

Without packing, a sample is (input_ids, labels), padded on the right (the causal mask keeps real
tokens from seeing the padding). With `data.sample_packing`, examples are laid one after another
into sequences of max_seq_len, a sample is (input_ids, position_ids, labels), and the positions
restart at each example so that it attends only to itself (see dlray.models.gpt.compute_loss).
Conversations, not tokens, are split into train/val/test (see dlray.data.text, whose source this serves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import TensorDataset

if TYPE_CHECKING:  # transformers loads where a tokenizer is made (dlray.data.text)
    from transformers import PreTrainedTokenizerBase

# The label of a position not trained on (prompt, padding): the ignore_index that PyTorch's
# cross_entropy and transformers' losses skip by default, as dlray.models.gpt.compute_loss does.
IGNORE_INDEX = -100

# Named templates for tokenizers that come without one. zephyr ends each turn with the tokenizer's
# EOS token, so a model trained on it stops by itself at the end of its answer.
CHAT_TEMPLATES = {
    "zephyr": "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
}
ROW_FIELDS = ("messages", "prompt", "response")


def chat_samples(conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, cfg) -> dict:
    """Conversations -> (input_ids, [position_ids,] labels) arrays, padded or (data.sample_packing) packed."""
    examples = [tokenize_conversation(tokenizer, messages, cfg.max_seq_len) for messages in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = (pack if cfg.sample_packing else pad)(examples, pad_id, cfg.max_seq_len).tensors
    names = ("input_ids", "position_ids", "labels") if cfg.sample_packing else ("input_ids", "labels")
    return {name: tensor.numpy() for name, tensor in zip(names, samples)}


def to_messages(row: dict) -> list[dict]:
    if row.get("messages"):
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if row.get("prompt") and row.get("response"):
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise ValueError(f"a chat row needs `messages`, or `prompt` and `response`; got the fields {sorted(k for k, v in row.items() if v)}")


def bundled_conversations() -> list[list[dict]]:
    """One question and answer per help topic that ships with Python: 'In Python, what is the
    "assert" statement?' answered by the first paragraph of that topic."""
    from pydoc_data.topics import topics

    conversations = []
    for name in sorted(topics):
        title, *paragraphs = [p.strip() for p in topics[name].strip().split("\n\n")]
        title = title.split("\n")[0]  # drop the reStructuredText underline
        prose = next((p for p in paragraphs if p and not p.startswith(("*", "-", "=")) and "::=" not in p), None)
        if prose:
            question = f"In Python, what is {title[0].lower() + title[1:]}?"
            conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(prose.split())}])
    return conversations


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversation's token ids and which of them are the assistant's, cut to max_seq_len + 1 tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template renders a conversation's beginning as something other than the beginning of the whole "
                             "conversation, so the assistant's turns cannot be told apart: use another data.chat_template")
        spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    trained = [any(start <= first < end for start, end in spans) for first, _ in encoding["offset_mapping"]]
    return torch.tensor(encoding["input_ids"][: max_seq_len + 1]), torch.tensor(trained[: max_seq_len + 1])


def shifted(ids: torch.Tensor, trained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): each position's label is the next token if the assistant said it."""
    return ids[:-1], torch.where(trained[1:], ids[1:], IGNORE_INDEX)


def pad(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, max_seq_len: int) -> TensorDataset:
    input_ids = torch.full((len(examples), max_seq_len), pad_id)
    labels = torch.full((len(examples), max_seq_len), IGNORE_INDEX)
    for row, (ids, trained) in enumerate(examples):
        inputs, targets = shifted(ids, trained)
        input_ids[row, : len(inputs)], labels[row, : len(targets)] = inputs, targets
    return TensorDataset(input_ids, labels)


def pack(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, max_seq_len: int) -> TensorDataset:
    """Examples in order, each into the current sequence while it fits, else into a new one."""
    rows, row, used = [], [], 0
    for ids, trained in examples:
        if row and used + len(ids) - 1 > max_seq_len:  # an example of n tokens fills n - 1 positions
            rows.append(row)
            row, used = [], 0
        row.append((ids, trained))
        used += len(ids) - 1
    rows += [row] if row else []
    input_ids = torch.full((len(rows), max_seq_len), pad_id)
    labels = torch.full((len(rows), max_seq_len), IGNORE_INDEX)
    position_ids = torch.arange(max_seq_len).repeat(len(rows), 1)  # the padding after the last example: one more "example"
    for r, row in enumerate(rows):
        start = 0
        for ids, trained in row:
            inputs, targets = shifted(ids, trained)
            end = start + len(inputs)
            input_ids[r, start:end], labels[r, start:end], position_ids[r, start:end] = inputs, targets, torch.arange(len(inputs))
            start = end
        position_ids[r, start:] = torch.arange(max_seq_len - start)
    return TensorDataset(input_ids, position_ids, labels)
