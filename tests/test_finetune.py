"""Fine-tuning without Ray: config errors name the key and the reason before anything starts, chat
data trains only on what the assistant says, and packed examples compute what they would alone.
(Training under every strategy, export and merge: test_strategies; the Ray path: test_llm_finetune.)
"""

import json

import pytest
import torch

from dlray.config import ConfigError, config_from_dict
from dlray.data import build_data
from dlray.data.chat import CHAT_TEMPLATES, pack, pad, tokenize_conversation
from dlray.data.text import train_tokenizer
from dlray.models import gpt

from strategy_worker import make_llm_base

LLM = {"model": {"family": "gpt", "name_or_path": "/models/llm"}, "data": {"name": "text"}}


@pytest.mark.parametrize("job, message", [
    ({"finetune": {"finetuning_type": "lora"}}, "adapts a pretrained model: set model.name_or_path"),
    ({**LLM, "finetune": {"lora_r": 16}}, "finetune.lora_r applies only to finetune.finetuning_type 'lora' or 'qlora'"),
    ({**LLM, "finetune": {"finetuning_type": "qlora"}, "strategy": {"name": "fsdp"}}, "FSDP and ZeRO-3 cannot shard"),
    ({**LLM, "finetune": {"finetuning_type": "qlora"}, "strategy": {"name": "deepspeed", "zero_stage": 3}}, "FSDP and ZeRO-3 cannot shard"),
    ({**LLM, "finetune": {"finetuning_type": "freeze"}}, "'freeze' is not supported by model.family 'gpt' (it supports full, lora, qlora, prompt_tuning)"),
    ({**LLM, "finetune": {"finetuning_type": "lora"}, "train": {"ema_decay": 0.99}}, "drop train.ema_decay"),
    ({"model": {"family": "bert", "name_or_path": "/models/bert"}, "data": {"name": "text_classification"}, "finetune": {"finetuning_type": "prompt_tuning"}},
     "'prompt_tuning' is not supported by model.family 'bert' (it supports full, freeze, lora, qlora)"),
    ({"model": {"family": "vit", "name_or_path": "/models/vit"}, "finetune": {"finetuning_type": "lora"}},
     "'lora' is not supported by model.family 'vit' (it supports full, freeze)"),
    ({**LLM, "finetune": {"finetuning_type": "prompt_tuning"}, "data": {"name": "text", "type": "chat_template", "sample_packing": True}},
     "set data.sample_packing false"),
    ({**LLM, "data": {"name": "text", "vocab_size": 4096}}, "model.name_or_path brings its own: drop data.vocab_size"),
    ({"model": {"family": "cnn", "name_or_path": "/models/x"}}, "model.name_or_path applies only to model.family 'gpt' or 'vit' or 'bert', got model.family 'cnn'"),
    ({"model": {"family": "gpt"}, "data": {"name": "text", "sample_packing": True}}, "data.sample_packing applies to data.type 'chat_template'"),
])
def test_config_errors_name_the_key_and_the_reason(job, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(job)


def test_a_pretrained_model_brings_its_tokenizer():
    cfg = config_from_dict({**LLM, "finetune": {"finetuning_type": "qlora", "lora_target_modules": ["q_proj", "v_proj"]}})
    assert cfg.data.tokenizer == "/models/llm" and cfg.finetune.adapter and cfg.finetune.lora_target_modules == ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer(["The quick brown fox jumps over the lazy dog. Ask and answer."] * 4, 300)
    tokenizer.chat_template = CHAT_TEMPLATES["zephyr"]
    return tokenizer


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ask the fox"},
                {"role": "assistant", "content": "The fox jumps."}, {"role": "user", "content": "And the dog?"},
                {"role": "assistant", "content": "Lazy."}]


def test_only_the_assistants_turns_are_trained_on(tokenizer):
    ids, trained = tokenize_conversation(tokenizer, CONVERSATION, max_seq_len=256)
    assert tokenizer.decode(ids[trained]) == "The fox jumps.</s>\nLazy.</s>\n"  # each answer and the end of its turn
    [(input_ids, labels)] = list(pad([(ids, trained)], tokenizer.pad_token_id, 256))
    targets = labels[labels != gpt.IGNORE_INDEX]
    assert tokenizer.decode(targets) == "The fox jumps.</s>\nLazy.</s>\n"
    # Shifted: the label at a position is the next input token.
    positions = (labels != gpt.IGNORE_INDEX).nonzero().squeeze(1)
    assert torch.equal(labels[positions], ids[positions + 1])
    assert (input_ids[len(ids) - 1:] == tokenizer.pad_token_id).all()


def test_truncation_keeps_max_seq_len_plus_one_tokens(tokenizer):
    ids, trained = tokenize_conversation(tokenizer, CONVERSATION, max_seq_len=10)
    assert len(ids) == len(trained) == 11


def test_a_template_that_rewrites_the_beginning_is_refused():
    bad = train_tokenizer(["x y z"] * 4, 300)
    # Renders the number of messages first: a shorter conversation is not a prefix of the whole.
    bad.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot be told apart"):
        tokenize_conversation(bad, CONVERSATION, max_seq_len=64)


def test_packed_examples_compute_what_they_compute_alone(tokenizer):
    """Each packed example attends only to itself: its per-token losses equal the unpacked ones."""
    torch.manual_seed(0)
    model = gpt.build({"flavor": "debug", "dropout": 0.0}, {"vocab_size": len(tokenizer), "max_seq_len": 128, "bos_token_id": 1,
                                                          "eos_token_id": 2, "pad_token_id": 0}).eval()
    examples = [tokenize_conversation(tokenizer, CONVERSATION[:3], 128), tokenize_conversation(tokenizer, CONVERSATION[3:], 128)]
    packed = pack(examples, tokenizer.pad_token_id, 128)
    assert len(packed) == 1
    input_ids, position_ids, labels = (t[None] for t in packed[0])
    alone = pad(examples, tokenizer.pad_token_id, 128)
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
        start = 0
        for i, (ids, _) in enumerate(examples):
            n = len(ids) - 1
            single = model(input_ids=alone[i][0][None, :n], use_cache=False).logits[0]
            assert torch.allclose(logits[start : start + n], single, atol=1e-4)
            start += n
    assert position_ids[0, len(examples[0][0]) - 1] == 0  # the second example's positions restart


def test_chat_rows_load_from_jsonl_as_messages_or_prompt_and_response(tmp_path):
    make_llm_base(tmp_path / "base", steps=0)
    # Distinct conversations: copies of one are one document to the hash split, which keeps them together.
    rows = [row for i in range(10) for row in ({"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello there."}]},
                                               {"prompt": f"Name colour {i}", "response": "Blue."})]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = config_from_dict({"model": {"family": "gpt", "name_or_path": str(tmp_path / "base")}, "finetune": {"finetuning_type": "lora"},
                            "data": {"name": "text", "type": "chat_template", "chat_template": "zephyr", "path": str(tmp_path / "chats.jsonl"),
                                     "max_seq_len": 32, "val_fraction": 0.1, "test_fraction": 0.1}})
    data = build_data(cfg.data, seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 20
    decoded = {data.tokenizer.decode(labels[labels != gpt.IGNORE_INDEX]) for _, labels in data.train}
    assert decoded == {"Hello there.</s>\n", "Blue.</s>\n"}
    assert data.tokenizer.chat_template == CHAT_TEMPLATES["zephyr"]  # saved with the tokenizer into checkpoints and exports

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "only a prompt"}))
    with pytest.raises(ValueError, match="needs `messages`, or `prompt` and `response`"):
        build_data(cfg.data.model_copy(update={"path": str(tmp_path / "bad.jsonl")}), seed=0)


def test_qlora_loads_the_base_linears_in_4_bits(tmp_path):
    from bitsandbytes.nn import Linear4bit

    from dlray.loop import build_model

    cfg = config_from_dict({"model": {"family": "gpt", "name_or_path": str(make_llm_base(tmp_path / "base", steps=0))}, "data": {"name": "text"},
                            "finetune": {"finetuning_type": "qlora"}, "precision": "bf16"})
    model = build_model(gpt.FAMILY, cfg, {})
    quantised = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantised) == 14 and all(m.weight.dtype == torch.uint8 for m in quantised)  # 2 layers x 7 projections
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
