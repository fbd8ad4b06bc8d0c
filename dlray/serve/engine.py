"""Batched text generation over a Hugging Face causal LM: plain PyTorch and transformers, no Ray.

    engine = Engine.from_pretrained("out/llm")   # any directory AutoModelForCausalLM/AutoTokenizer load
    sequences = [Sequence(engine.tokenizer.encode(p), SamplingParams(max_tokens=32, temperature=0)) for p in prompts]
    for deltas in engine.generate(sequences):    # one decoding step of every sequence at a time
        ...                                      # deltas[i]: what sequence i added, None once it has finished

With LoRA adapters loaded (`engine.load_adapters({"name": dir})`), each sequence names its adapter
(None: the base model) and one batch mixes them: PEFT applies each row's own adapter.

Prompts of different lengths are left-padded into one batch with an attention mask and position
ids counted from each prompt's first real token, so a row computes what it would alone; the KV
cache (`past_key_values`) carries each step to the next, and finished rows leave the batch. Each
sequence samples with its own temperature / top_p and its own torch.Generator, so a seeded
sequence draws the same tokens alone or batched with others.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability
    stop: tuple[str, ...] = ()  # the text ends before the first of these; they are not returned
    seed: int | None = None  # None: a fresh random seed


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to one sequence."""

    text: str  # "" while the new end may still change: a stop string's start, half a character
    finish_reason: str | None  # "stop" (EOS or a stop string) or "length" (max_tokens) on its last step
    completion_tokens: int  # tokens sampled so far, the EOS or the stop string's last token included


@dataclass
class Sequence:
    """One completion: its prompt, how to sample it and what it has produced so far."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # a LoRA adapter's name (Engine.load_adapters); None: the base model
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the completion decoded so far, cut before a stop string
    sent: int = 0  # characters of `text` already handed out in Deltas
    finish_reason: str | None = None
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)


class Engine:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_context = model.config.max_position_embeddings
        self.adapters: set[str] = set()
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}

    @classmethod
    def from_pretrained(cls, directory: str) -> "Engine":
        return cls(AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory))

    def load_adapters(self, adapters: dict[str, str]) -> None:
        """LoRA adapters (PEFT directories, e.g. `dlray export` of LoRA / QLoRA runs over this base) by name."""
        from peft import PeftModel

        for name, directory in adapters.items():
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(directory, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, directory, adapter_name=name).eval()
        self.adapters = set(adapters)

    @torch.inference_mode()
    def generate(self, sequences: list[Sequence]) -> Iterator[list[Delta | None]]:
        """Decode all `sequences` together, one step per iteration, until each has finished.
        A sequence's prompt plus its max_tokens must fit in `max_context` (the caller checks)."""
        device = self.model.device
        width = max(len(s.prompt_ids) for s in sequences)
        # Left padding: every row's next token goes in the same (last) column. The pad id is
        # never attended to, so any id works.
        input_ids = torch.tensor([[0] * (width - len(s.prompt_ids)) + s.prompt_ids for s in sequences], device=device)
        attention_mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in sequences], device=device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        active = list(range(len(sequences)))  # the sequence behind each row of the batch
        while active:
            # "__base__": PEFT's name for rows that use no adapter
            adapters = {"adapter_names": [sequences[index].adapter or "__base__" for index in active]} if self.adapters else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1, **adapters)
            cache = out.past_key_values
            # Sampling runs on the CPU, where each sequence's generator lives.
            logits = out.logits[:, -1].float().cpu()
            deltas: list[Delta | None] = [None] * len(sequences)
            for row, index in enumerate(active):
                deltas[index] = self.append(sequences[index], sample(logits[row], sequences[index]))
            yield deltas
            keep = [row for row, index in enumerate(active) if sequences[index].finish_reason is None]
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=device, dtype=torch.long)
                cache.batch_select_indices(rows)
                attention_mask = attention_mask[rows]
            active = [active[row] for row in keep]
            input_ids = torch.tensor([[sequences[index].token_ids[-1]] for index in active], device=device, dtype=torch.long)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
            position_ids = attention_mask.sum(-1, keepdim=True) - 1

    def append(self, seq: Sequence, token: int) -> Delta:
        """Add a sampled token to `seq`; decide whether it has finished; hand out the text that can
        no longer change."""
        seq.token_ids.append(token)
        params = seq.params
        # Decoding all tokens again, rather than the new one alone, joins multi-byte characters
        # and word-boundary spaces the way the tokenizer does for the whole text.
        seq.text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
        # Anything that contains a stop string now ends after what was already sent (the held-back
        # tail below guarantees it), so searching from there finds the first.
        cuts = [cut for cut in (seq.text.find(stop, seq.sent) for stop in params.stop) if cut >= 0]
        if cuts:
            seq.text, seq.finish_reason = seq.text[: min(cuts)], "stop"
        elif token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= params.max_tokens:
            seq.finish_reason = "length"
        end = len(seq.text)
        if seq.finish_reason is None:
            # Hold back a tail that may still become a stop string, and an incomplete UTF-8
            # character (decoded as U+FFFD until its last byte arrives).
            end -= max((len(stop) - 1 for stop in params.stop), default=0)
            while end > seq.sent and seq.text[end - 1] == "\ufffd":
                end -= 1
        new_text, seq.sent = seq.text[seq.sent : max(end, seq.sent)], max(end, seq.sent)
        return Delta(new_text, seq.finish_reason, len(seq.token_ids))


def sample(logits: torch.Tensor, seq: Sequence) -> int:
    """The next token from one row of logits (vocab,): greedy at temperature 0, else drawn with the
    sequence's own generator from the temperature-scaled, top_p-truncated distribution."""
    params = seq.params
    if params.temperature == 0:
        return int(logits.argmax())
    # In float64, from the largest logit down: the API takes any temperature and top_p above 0, and
    # below float32's range a temperature would scale logits to inf and NaN, and a top_p would round
    # to 0 and drop even the most likely token.
    probs = torch.softmax((logits.double() - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token once the more likely ones already hold top_p of the mass (the first stays).
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= params.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
