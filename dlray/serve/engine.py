"""Text generation over a Hugging Face causal LM, one decoding step at a time, sequences joining
and leaving the batch between steps (continuous batching): plain PyTorch and transformers, no Ray.

    engine = Engine.from_pretrained("out/llm")   # any directory AutoModelForCausalLM/AutoTokenizer load
    sequences = [Sequence(engine.tokenizer.encode(p), SamplingParams(max_tokens=32, temperature=0)) for p in prompts]
    for deltas in engine.generate(sequences):    # one decoding step of every sequence at a time
        ...                                      # deltas[i]: what sequence i added, None once it has finished

    engine.step(admit=[seq])                     # what a server's decode loop calls (dlray.serve.scheduler):
                                                 # [(sequence, Delta)] of every running sequence

A step either prefills the sequences admitted in it (their prompts in one forward pass, which also
samples their first token) and merges their KV cache into the running batch, or, when none are
admitted, decodes one token for every running sequence: prefill first, as vLLM's scheduler did
before chunked prefill, so a new request's first token waits for one step, not two. Rows are left-padded, with an attention mask and position ids counted from
each prompt's first real token, so a row computes what it would alone; finished (or aborted) rows
leave the batch at once, and cache columns no running row still needs are cut off.

With LoRA adapters loaded (`engine.load_adapters({"name": dir})`), each sequence names its adapter
(None: the base model) and one batch mixes them: PEFT applies each row's own adapter.

The KV cache, the logits and the sampling stay on the model's device. Each sequence samples with its
own temperature / top_p and its own torch.Generator (on that device), so a seeded sequence draws the
same tokens alone or batched with others, whenever it joins. Logprobs, when asked, are the model's
own distribution: log_softmax of the raw logits in float32, before temperature and top_p (vLLM's
default), for each sampled token and, with `prompt_logprobs`, for each prompt token after the first.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0: the prompt alone is computed (for its logprobs), nothing is sampled
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability
    stop: tuple[str, ...] = ()  # the text ends before the first of these; they are not returned
    seed: int | None = None  # None: a fresh random seed
    logprobs: int | None = None  # the logprob of each sampled token and this many most likely; None: none
    prompt_logprobs: int | None = None  # the same for each prompt token after the first; None: none


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model, and the `k` most likely tokens' at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to one sequence."""

    text: str  # "" while the new end may still change: a stop string's start, half a character
    finish_reason: str | None  # "stop" (EOS or a stop string) or "length" (max_tokens) on its last step
    completion_tokens: int  # tokens sampled so far, the EOS or the stop string's last token included
    logprob: Logprob | None = None  # this step's token's, where params.logprobs asks for them


@dataclass(eq=False)  # compared and hashed by identity: the engine and schedulers key their state by sequence
class Sequence:
    """One completion: its prompt, how to sample it and what it has produced so far."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # a LoRA adapter's name (Engine.load_adapters); None: the base model
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the completion decoded so far, cut before a stop string
    sent: int = 0  # characters of `text` already handed out in Deltas
    finish_reason: str | None = None
    logprobs: list[Logprob] = field(default_factory=list)  # one per sampled token, where params.logprobs is set
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)  # one per prompt token (the first: None)
    seed: int = field(init=False)
    generator: torch.Generator = field(init=False)  # on the CPU until the engine admits it to its device

    def __post_init__(self):
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def reserved_tokens(self) -> int:
        """The most KV-cache entries it can come to hold: its prompt and max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens


class Engine:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_context = model.config.max_position_embeddings
        self.adapters: set[str] = set()
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.reset()

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

    def reset(self) -> None:
        """Drop every running sequence and the KV cache (after a failed step: its state is unknown)."""
        self.running: list[Sequence] = []  # the sequence behind each row of the batch
        self.cache = None  # the running rows' past_key_values
        self.attention_mask: torch.Tensor | None = None  # (rows, cache columns): 0 where a row is padded

    def generate(self, sequences: list[Sequence]) -> Iterator[list[Delta | None]]:
        """Decode `sequences` together on an idle engine, one step per iteration, until each has finished.
        A sequence's prompt plus its max_tokens must fit in `max_context` (the caller checks)."""
        if self.running:
            raise RuntimeError("Engine.generate needs an idle engine: this one is decoding sequences of a scheduler")
        row = {seq: index for index, seq in enumerate(sequences)}
        admit: list[Sequence] = list(sequences)
        while admit or self.running:
            deltas: list[Delta | None] = [None] * len(sequences)
            for seq, delta in self.step(admit):
                deltas[row[seq]] = delta
            admit = []
            yield deltas

    @torch.inference_mode()
    def step(self, admit: Iterable[Sequence] = (), abort: Iterable[Sequence] = ()) -> list[tuple[Sequence, Delta]]:
        """Drop the `abort`ed sequences; prefill the `admit`ted ones (sampling their first token) into
        the batch, or, with none admitted, decode one token for each running one; what each sequence
        added in this step.
        The caller keeps within its limits: every sequence's prompt + max_tokens fits `max_context`."""
        aborted = set(abort)
        if aborted:
            self._keep([seq not in aborted for seq in self.running])
        admit = list(admit)
        outputs = self._prefill(admit) if admit else self._decode() if self.running else []
        self._keep([seq.finish_reason is None for seq in self.running])
        return outputs

    def _decode(self) -> list[tuple[Sequence, Delta]]:
        device = self.attention_mask.device
        input_ids = torch.tensor([[seq.token_ids[-1]] for seq in self.running], device=device)
        attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(self.running), 1)], dim=1)
        position_ids = attention_mask.sum(-1, keepdim=True) - 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1, **self._adapter_names(self.running))
        self.cache, self.attention_mask = out.past_key_values, attention_mask
        return self._sample(self.running, out.logits[:, -1])

    def _prefill(self, new: list[Sequence]) -> list[tuple[Sequence, Delta]]:
        device = self.model.device
        for seq in new:
            if seq.generator.device != device:
                seq.generator = torch.Generator(device).manual_seed(seq.seed)
        width = max(len(seq.prompt_ids) for seq in new)
        # Left padding: every row's next token goes in the same (last) column. The pad id is never
        # attended to, so any id works.
        input_ids = torch.tensor([[0] * (width - len(seq.prompt_ids)) + seq.prompt_ids for seq in new], device=device)
        attention_mask = torch.tensor([[0] * (width - len(seq.prompt_ids)) + [1] * len(seq.prompt_ids) for seq in new], device=device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        scored = [row for row, seq in enumerate(new) if seq.params.prompt_logprobs is not None]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=0 if scored else 1, **self._adapter_names(new))  # 0: every position's logits
        for row in scored:
            seq = new[row]
            # The logits at column c predict the token at c + 1: the prompt's from its second token on.
            start = width - len(seq.prompt_ids)
            logits = out.logits[row, start : width - 1]
            seq.prompt_logprobs = [None, *token_logprobs(logits, torch.tensor(seq.prompt_ids[1:], device=device), seq.params.prompt_logprobs)]
        self._merge(new, out.past_key_values, attention_mask)
        sampling = [seq for seq in new if seq.params.max_tokens > 0]
        outputs = self._sample(sampling, out.logits[[row for row, seq in enumerate(new) if seq.params.max_tokens > 0], -1]) if sampling else []
        for seq in new:
            if seq.params.max_tokens == 0:  # the prompt alone was asked for
                seq.finish_reason = "length"
                outputs.append((seq, Delta("", "length", 0)))
        return outputs

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, Delta]]:
        """Sample the next token of each of `sequences` from its row of `logits` (rows, vocab) and append it."""
        tokens = sample(logits, sequences)
        asked = [row for row, seq in enumerate(sequences) if seq.params.logprobs is not None]
        logprobs: dict[int, Logprob] = {}
        if asked:
            k = max(sequences[row].params.logprobs for row in asked)
            for row, logprob in zip(asked, token_logprobs(logits[asked], tokens[asked], k)):
                logprobs[row] = Logprob(logprob.token_id, logprob.logprob, logprob.top[: sequences[row].params.logprobs])
        return [(seq, self.append(seq, token, logprobs.get(row))) for row, (seq, token) in enumerate(zip(sequences, tokens.tolist()))]

    def _merge(self, new: list[Sequence], cache, attention_mask: torch.Tensor) -> None:
        """Add freshly prefilled rows to the running batch: both left-padded to the wider, stacked."""
        if self.cache is None:
            self.running, self.cache, self.attention_mask = list(new), cache, attention_mask
            return
        width = max(self.attention_mask.shape[1], attention_mask.shape[1])

        def widen(tensor: torch.Tensor, dim: int) -> torch.Tensor:  # zeros on the left of `dim` up to `width`
            pad = [0, 0] * (tensor.dim() - 1 - dim) + [width - tensor.shape[dim], 0]
            return F.pad(tensor, pad)

        for running, added in zip(self._layers(self.cache), self._layers(cache)):
            running.keys = torch.cat([widen(running.keys, 2), widen(added.keys, 2)])
            running.values = torch.cat([widen(running.values, 2), widen(added.values, 2)])
        self.attention_mask = torch.cat([widen(self.attention_mask, 1), widen(attention_mask, 1)])
        self.running += new

    def _keep(self, keep: list[bool]) -> None:
        """Keep the rows marked True; cut the cache columns that are padding in every row left."""
        if all(keep):
            return
        if not any(keep):
            self.reset()
            return
        rows = torch.tensor([row for row, kept in enumerate(keep) if kept], device=self.attention_mask.device)
        self.running = [seq for seq, kept in zip(self.running, keep) if kept]
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        first = int(self.attention_mask.any(0).int().argmax())  # the first column some row attends to
        if first:
            for layer in self._layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.attention_mask = self.attention_mask[:, first:]

    @staticmethod
    def _layers(cache) -> list[DynamicLayer]:
        # Rows join and leave by editing the cache's tensors: that needs the plain layer that keeps
        # every position (sliding-window and static layers keep theirs otherwise).
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise NotImplementedError(f"dlray's engine batches models whose KV cache is DynamicLayer only, this one uses {kinds}")
        return cache.layers

    def _adapter_names(self, sequences: list[Sequence]) -> dict:
        # "__base__": PEFT's name for rows that use no adapter
        return {"adapter_names": [seq.adapter or "__base__" for seq in sequences]} if self.adapters else {}

    def append(self, seq: Sequence, token: int, logprob: Logprob | None = None) -> Delta:
        """Add a sampled token to `seq`; decide whether it has finished; hand out the text that can
        no longer change."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
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
        return Delta(new_text, seq.finish_reason, len(seq.token_ids), logprob)


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """The next token of each sequence from its row of `logits` (rows, vocab), on their device:
    greedy at temperature 0, else drawn with the sequence's own generator from the
    temperature-scaled, top_p-truncated distribution."""
    tokens = logits.argmax(-1)
    drawn = [row for row, seq in enumerate(sequences) if seq.params.temperature > 0]
    if not drawn:
        return tokens
    device = logits.device
    temperature = torch.tensor([sequences[row].params.temperature for row in drawn], dtype=torch.float64, device=device)
    top_p = torch.tensor([sequences[row].params.top_p for row in drawn], dtype=torch.float64, device=device)
    # In float64, from the largest logit down: the API takes any temperature and top_p above 0, and
    # below float32's range a temperature would scale logits to inf and NaN, and a top_p would round
    # to 0 and drop even the most likely token.
    rows = logits[drawn].double()
    probs = torch.softmax((rows - rows.max(-1, keepdim=True).values) / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop a token once the more likely ones already hold top_p of the mass (the first stays); rows
    # at top_p 1 keep all, even where the running sum rounds up to 1 early.
    drop = (sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]) & (top_p < 1)[:, None]
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0))
    for index, row in enumerate(drawn):
        tokens[row] = torch.multinomial(probs[index], 1, generator=sequences[row].generator)[0]
    return tokens


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[Logprob]:
    """Each row's token's log-probability under log_softmax(logits) (float32), and the k most likely."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [Logprob(token, value, tuple(zip(ids, values)))
            for token, value, ids, values in zip(token_ids.tolist(), chosen, top_ids.tolist(), top_values.tolist())]
