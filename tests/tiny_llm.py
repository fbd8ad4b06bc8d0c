"""The servable causal LM the generate tests serve: a tiny random LlamaForCausalLM and a byte-level BPE
tokenizer trained here on the Python docs' topic texts (pydoc_data, in the standard library), with a
small chat template, and LoRA adapters over it.
"""

import json
from pydoc_data.topics import topics

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MAX_CONTEXT = 128
PROMPTS = ["Hi", "def f(x):", "The quick brown fox jumps over the lazy dog, and then the dog chases the fox around the garden."]


def write_llm_artifact(directory, chat_template: str | None = CHAT_TEMPLATE, hidden_size: int = 64):
    """A servable causal-LM directory: model and tokenizer as save_pretrained writes them, and a
    dlray.json naming the task (the metadata dlray.serve.app reads). vLLM's CPU attention wants
    heads of 32 and up: hidden_size=128 for it (4 heads)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(topics.values(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", chat_template=chat_template)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=MAX_CONTEXT, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "dlray.json").write_text(json.dumps({"task": "generate", "model": {"family": "gpt"}, "serve": {}}))
    return directory


def write_lora_adapter(base, directory, seed: int):
    """A LoRA adapter over `base` with random (not zero) weights, in PEFT's layout, as `dlray export` writes one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # random B: the adapter changes the output
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(directory)
    return str(directory)
