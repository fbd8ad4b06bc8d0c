"""Preference tuning without Ray: DPO, ORPO and KTO losses as TRL defines them, the reference model
(the base with adapters disabled; a frozen copy for full fine-tunes), preference rows read, checked and
cut as TRL cuts them, and a few DPO steps that teach a LoRA model to prefer the chosen completions.
(The Ray path, export and serving: test_llm_finetune.)
"""

import json
import math

import pytest
import torch

from dlray import finetune
from dlray.config import ConfigError, config_from_dict
from dlray.config.sections import PAIR_METRICS
from dlray.data import build_data
from dlray.data.preference import truncate
from dlray.loop import build_model
from dlray.models import gpt

from strategy_worker import make_llm_base

IGNORE = gpt.IGNORE_INDEX
# float64: the issue's tolerance, 1e-6, is below float32's resolution of IPO's squares
CHOSEN, REJECTED = torch.tensor([-3.0, -10.0, -7.5], dtype=torch.float64), torch.tensor([-4.0, -9.0, -12.0], dtype=torch.float64)
REF_CHOSEN, REF_REJECTED = torch.tensor([-3.5, -9.0, -8.0], dtype=torch.float64), torch.tensor([-3.9, -9.5, -10.0], dtype=torch.float64)
LENGTHS = (torch.tensor([3, 5, 4]), torch.tensor([2, 5, 6]))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_loss_is_trls(loss_type, smoothing):
    """Against TRL's dpo_trainer formulas, computed one pair at a time with `math` (beta 0.1)."""
    beta = 0.1
    loss, chosen_rewards, rejected_rewards = finetune.dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta, loss_type, smoothing, *LENGTHS)
    for i in range(3):
        chosen_ratio, rejected_ratio = (CHOSEN[i] - REF_CHOSEN[i]).item(), (REJECTED[i] - REF_REJECTED[i]).item()
        margin = chosen_ratio - rejected_ratio
        expected = {
            "sigmoid": -log_sigmoid(beta * margin) * (1 - smoothing) - log_sigmoid(-beta * margin) * smoothing,
            "hinge": max(0.0, 1 - beta * margin),
            "ipo": (chosen_ratio / LENGTHS[0][i].item() - rejected_ratio / LENGTHS[1][i].item() - 1 / (2 * beta)) ** 2,
        }[loss_type]
        assert loss[i].item() == pytest.approx(expected, abs=1e-6)
        assert chosen_rewards[i].item() == pytest.approx(beta * chosen_ratio, abs=1e-6)
        assert rejected_rewards[i].item() == pytest.approx(beta * rejected_ratio, abs=1e-6)
    metrics = finetune.pair_metrics(chosen_rewards, rejected_rewards, CHOSEN, REJECTED)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0, 1.0]
    assert torch.allclose(metrics["rewards/margins"], chosen_rewards - rejected_rewards)


def test_orpo_and_kto_losses_are_trls():
    beta = 0.25
    chosen, rejected = torch.tensor([-0.5, -2.0, -1e-4]), torch.tensor([-1.0, -0.1, -30.0])  # mean log-probabilities
    odds_loss, ratio, log_odds = finetune.orpo_odds_ratio_loss(chosen, rejected, beta)
    for i in range(3):
        c, r = chosen[i].item(), rejected[i].item()
        odds = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
        assert log_odds[i].item() == pytest.approx(odds, rel=1e-5)
        assert odds_loss[i].item() == pytest.approx(beta * log_sigmoid(odds), rel=1e-5)

    logps, ref_logps = torch.tensor([-5.0, -6.0, -4.0]), torch.tensor([-5.5, -5.0, -4.2])
    kl_logps, ref_kl_logps = torch.tensor([-9.0, -8.0, -7.0]), torch.tensor([-9.3, -8.1, -7.0])
    desirable = torch.tensor([True, False, True])
    loss, kl = finetune.kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, desirable, beta)
    expected_kl = max(0.0, (0.3 + 0.1 + 0.0) / 3)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)
    for i in range(3):
        ratio_i = (logps[i] - ref_logps[i]).item()
        z = beta * (ratio_i - expected_kl) if desirable[i] else beta * (expected_kl - ratio_i)
        assert loss[i].item() == pytest.approx(1 - 1 / (1 + math.exp(-z)), abs=1e-6)
    # The KL estimate never goes below 0, and is no path for gradients.
    assert finetune.kto_loss(logps, ref_logps, ref_kl_logps - 1, ref_kl_logps, desirable, beta)[1].item() == 0.0


def test_orpo_odds_ratio_equals_trls_own_function():
    """Where TRL is installed (it is no dlray dependency): its ORPO odds_ratio_loss, called on the same log-probabilities."""
    import types

    orpo = pytest.importorskip("trl.experimental.orpo")
    chosen, rejected = torch.tensor([-0.5, -2.0, -0.01]), torch.tensor([-1.0, -0.1, -3.0])
    trainer = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device="cpu"))
    losses, chosen_rewards, _, mean_ratio, mean_log_odds = orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    ours, ratio, log_odds = finetune.orpo_odds_ratio_loss(chosen, rejected, 0.1)
    assert torch.allclose(ours, losses, atol=1e-6) and abs(ratio.mean() - mean_ratio) < 1e-6 and abs(log_odds.mean() - mean_log_odds) < 1e-6


@pytest.mark.parametrize("job, message", [
    ({"finetune": {"objective": "dpo"}}, "finetune.objective 'dpo' trains on data.name 'preference' with data.type 'preference', got data.name 'text'"),
    ({"finetune": {"objective": "kto"}, "data": {"name": "preference"}}, "data.type 'unpaired_preference', got data.name 'preference' with data.type 'preference'"),
    ({"data": {"name": "preference"}}, "data.name 'preference' trains with finetune.objective 'dpo' or 'orpo'"),
    ({"finetune": {"objective": "orpo", "loss_type": "ipo"}, "data": {"name": "preference"}}, "finetune.loss_type applies only to finetune.objective 'dpo'"),
    ({"finetune": {"beta": 0.2}}, "finetune.beta applies only to finetune.objective 'dpo' or 'orpo' or 'kto'"),
    ({"finetune": {"objective": "dpo", "loss_type": "hinge", "label_smoothing": 0.1}, "data": {"name": "preference"}},
     "finetune.label_smoothing applies only to finetune.loss_type 'sigmoid'"),
    ({"finetune": {"objective": "dpo"}, "data": {"name": "preference"}, "train": {"metric": "val_accuracy"}}, "'val_rewards/accuracies'"),
    ({"finetune": {"objective": "dpo"}, "data": {"name": "preference"}, "train": {"metric": "val_perplexity"}}, "and finetune.objective 'dpo', got 'val_perplexity'"),
    ({"finetune": {"objective": "dpo"}, "data": {"name": "preference", "text_field": "body"}}, "data.prompt_field"),
    ({"finetune": {"objective": "dpo"}, "data": {"name": "preference", "max_seq_len": 64, "max_prompt_len": 64}}, "data.max_prompt_len must be below"),
])
def test_config_errors_name_the_key(job, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"model": {"family": "gpt"}, "data": {"name": "text"}} | job)


def test_validation_metrics_in_trls_names_can_drive_the_run():
    cfg = config_from_dict({"model": {"family": "gpt"}, "finetune": {"objective": "dpo"}, "data": {"name": "preference"},
                            "train": {"metric": "val_rewards/accuracies", "mode": "max"}})
    assert cfg.train.metric == "val_rewards/accuracies"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_llm_base(tmp_path_factory.mktemp("preference") / "base", steps=0)


def preference_job(base, rows_path=None, finetuning_type="lora", **data):
    keys = {"name": "preference", "chat_template": "zephyr", "max_seq_len": 48, "max_prompt_len": 16} | data
    if rows_path:
        keys["path"] = str(rows_path)
    objective = "kto" if data.get("type") == "unpaired_preference" else "dpo"
    return config_from_dict({"model": {"family": "gpt", "name_or_path": str(base)}, "finetune": {"finetuning_type": finetuning_type, "objective": objective},
                             "data": keys, "precision": "fp32", "train": {"seed": 0}})


def test_rows_train_only_on_completions_and_bad_rows_are_named(base, tmp_path, capsys):
    rows = [{"question": f"Colour {i}?", "good": "Blue.", "bad": "Green, or blue, or red, or any colour at all." if i % 2 else "Red."}
            for i in range(12)]
    rows.append({"question": [{"role": "user", "content": "Sky?"}], "good": [{"role": "assistant", "content": "Blue."}],
                 "bad": [{"role": "assistant", "content": "Red."}]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = preference_job(base, path, prompt_field="question", chosen_field="good", rejected_field="bad", max_seq_len=12, max_prompt_len=4,
                         val_fraction=0.0, test_fraction=0.0)
    data = build_data(cfg.data, seed=0)
    tokenizer = data.tokenizer
    completions = {(tokenizer.decode(cl[cl != IGNORE]), tokenizer.decode(rl[rl != IGNORE])) for _, cl, _, rl in data.train}
    # Conversational: the assistant's turn as the template renders it; plain strings: the completion and EOS, and
    # a rejected completion too long for max_seq_len cut (after the prompt) to what fits.
    (cut,) = {rejected for _, rejected in completions if "Green" in rejected}
    assert completions == {("Blue.</s>\n", "Red.</s>\n"), ("Blue.</s>", "Red.</s>"), ("Blue.</s>", cut)} and not cut.endswith("</s>")
    # Counted: the 6 long rejected strings, and the conversation, whose rendered prompt is long.
    assert "7 of 13 preference rows cut to data.max_seq_len + 1 = 13 tokens" in capsys.readouterr().out
    for c, cl, _, _ in data.train:  # every label is the next input token
        at = (cl != IGNORE).nonzero().squeeze(1)
        assert torch.equal(cl[at[:-1]], c[at[:-1] + 1])

    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({"question": "Q?", "good": "A."}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 3: a data.type 'preference' row needs 'question', 'good', 'bad'; it lacks 'bad'"):
        build_data(cfg.data, seed=0)
    csv = tmp_path / "pairs.csv"
    csv.write_text("question,good,bad\nQ?,A.,B.\nQ2?,,B.\n")
    with pytest.raises(ValueError, match=r"pairs.csv, row 2: .* it lacks 'good'"):
        build_data(cfg.data.model_copy(update={"path": str(csv)}), seed=0)
    path.write_text(json.dumps({"question": "Q?", "good": [{"role": "assistant", "content": "A."}], "bad": "B."}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'question', 'good', 'bad' must all be strings or all be lists"):
        build_data(cfg.data, seed=0)


def test_truncation_cuts_the_prompt_first_as_trl():
    prompt, completions = list(range(10)), [[1] * 4, [2] * 7]
    assert truncate(prompt, completions, cap=17, max_prompt=5) == (prompt, completions, False)
    assert truncate(prompt, completions, cap=14, max_prompt=5) == (prompt[-5:], completions, True)  # the prompt's end alone is enough
    assert truncate(prompt, completions, cap=9, max_prompt=5) == (prompt[-5:], [[1] * 4, [2] * 4], True)


def test_kto_rows_pair_each_prompt_with_the_next_completion_for_the_kl_term(base, tmp_path):
    rows = [{"prompt": f"P{i}", "completion": f"C{i}", "label": i % 2 == 0} for i in range(3)]
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = preference_job(base, path, type="unpaired_preference", val_fraction=0.0, test_fraction=0.0)
    data = build_data(cfg.data, seed=0)
    decode = data.tokenizer.decode
    samples = [(decode(ids[ids != data.tokenizer.pad_token_id]), decode(kl_ids[kl_ids != data.tokenizer.pad_token_id]), label.item())
               for ids, _, kl_ids, _, label in data.train]
    assert sorted(samples) == [("P0C0", "P0C1", 1.0), ("P1C1", "P1C2", 0.0), ("P2C2", "P2C0", 1.0)]


def batch_of(dataset, rows=None):
    rows = range(len(dataset)) if rows is None else rows
    return [torch.stack(column) for column in zip(*[dataset[i] for i in rows])]


def test_the_reference_is_the_base_with_its_adapters_disabled(base):
    cfg = preference_job(base)
    data = build_data(cfg.data, seed=0)
    torch.manual_seed(0)
    model = build_model(gpt.FAMILY, cfg, data.info)
    family = finetune.objective(gpt.FAMILY, cfg, model, torch.device("cpu"))
    batch = batch_of(data.train, range(4))
    # Untrained adapters (LoRA's B is 0): policy = reference, so every reward is 0 and the loss log 2.
    values = family.compute_loss(model, batch)
    assert torch.allclose(values["loss"], torch.full((4,), math.log(2))) and not values["rewards/chosen"].any()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    plain = gpt.build({"name_or_path": str(base)}, data.info).eval()
    ids, labels = torch.cat(batch[0::2]), torch.cat(batch[1::2])
    with torch.no_grad():
        assert torch.allclose(finetune.reference_logps(model, None, ids, labels), finetune.sequence_logps(plain, ids, labels)[0], atol=1e-4)
        assert not torch.allclose(finetune.sequence_logps(model, ids, labels)[0], finetune.sequence_logps(plain, ids, labels)[0], atol=1e-2)
    values = family.compute_loss(model, batch)
    assert values["rewards/chosen"].abs().min() > 0 and all(name in values for name in PAIR_METRICS)


def test_a_full_finetune_keeps_a_frozen_copy_as_its_reference(base):
    cfg = preference_job(base, finetuning_type="full")
    data = build_data(cfg.data, seed=0)
    model = build_model(gpt.FAMILY, cfg, data.info)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    family = finetune.objective(gpt.FAMILY, cfg, model, torch.device("cpu"))
    reference = family.compute_loss.args[1]
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)  # TRL's disable_dropout
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    family.training_loss(model, batch_of(data.train, range(4)), "model").backward()
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(reference.lm_head.weight, gpt.build({"name_or_path": str(base)}, data.info).lm_head.weight)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_a_few_steps_teach_the_preference(base, objective):
    """On the generated pairs (chosen: a help topic's first paragraph; rejected: its words shuffled): DPO's held-out
    reward accuracy from 0 (policy = reference) to above chance; ORPO's and KTO's losses go down."""
    data_keys = {"type": "unpaired_preference"} if objective == "kto" else {}
    cfg = preference_job(base, **data_keys)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"objective": objective})})
    data = build_data(cfg.data, seed=0)
    torch.manual_seed(0)
    model = build_model(gpt.FAMILY, cfg, data.info)
    family = finetune.objective(gpt.FAMILY, cfg, model, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    val = batch_of(data.val)

    def evaluate():
        with torch.no_grad():
            return {key: value.mean().item() for key, value in family.compute_loss(model.eval(), val).items()}

    before = evaluate()
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        batch = batch_of(data.train, torch.randint(len(data.train), (8,), generator=generator).tolist())
        family.training_loss(model, batch, "model").backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate()
    if objective == "dpo":
        assert before["rewards/accuracies"] == 0.0 and after["rewards/accuracies"] > 0.5, after  # measured: 0.69 (11 of 16)
        assert after["rewards/margins"] > 0 and after["loss"] < before["loss"] == pytest.approx(math.log(2))
    else:
        assert after["loss"] < before["loss"], (before, after)


# --- the shipped job, end to end on the session's Ray -----------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(ray_cluster, base, tmp_path_factory):
    from dlray.config import load_config
    from dlray.train import fit

    from helpers import REPO

    tmp = tmp_path_factory.mktemp("dpo")
    cfg = load_config(REPO / "jobs/llm_dpo.yaml", [f"model.name_or_path={base}", f"run.storage_path={tmp}", "run.name=dpo", "train.num_epochs=2"])
    result = fit(cfg)
    assert result.error is None, result.error
    return cfg, tmp


@pytest.mark.slow
def test_the_dpo_job_widens_the_held_out_margin_as_served(dpo_run, base, serve_artifact):
    """jobs/llm_dpo.yaml (LoRA, 2 DDP workers) validated in TRL's metric names and exported merged; on the test split,
    the served model (scored through /v1/completions with echo and logprobs, as lm-eval scores) puts the chosen
    completions further above the rejected ones than the base does."""
    import openai

    from dlray import reports
    from dlray.export import export
    from dlray.runfiles import read_history
    from dlray.train import run_dir

    cfg, tmp = dpo_run
    history = reports.epochs(read_history(run_dir(cfg)))
    assert len(history) == cfg.train.num_epochs
    assert history[-1]["val_rewards/accuracies"] > 0.5 and history[-1]["val_rewards/margins"] > 0, history[-1]
    merged = export(run_dir(cfg), tmp / "merged", merge_lora=True)

    test = build_data(cfg.data, seed=cfg.train.seed).test
    sequences, completion_at = [], []
    for pair in test:
        for ids, labels in (pair[:2], pair[2:]):
            at = (labels != IGNORE).nonzero().squeeze(1)
            sequences.append(torch.cat([ids[: at[-1] + 1], labels[at[-1:]]]).tolist())
            completion_at.append(at + 1)  # the token a labelled position predicts is the next one
    client = openai.OpenAI(base_url=f"{serve_artifact(merged, name='dpo')}/v1", api_key="unused", max_retries=0, timeout=120)
    choices = [choice for start in range(0, len(sequences), 4)  # serve.max_completions_per_request: 4 prompts a request
               for choice in client.completions.create(model="merged", prompt=sequences[start : start + 4], max_tokens=0, echo=True, logprobs=0).choices]
    served = torch.tensor([sum(choice.logprobs.token_logprobs[i] for i in at.tolist()) for choice, at in zip(choices, completion_at)])
    plain = gpt.build({"name_or_path": str(base)}, {}).eval()
    with torch.no_grad():
        before = torch.cat([finetune.sequence_logps(plain, *batch_of(test)[i : i + 2])[0][:, None] for i in (0, 2)], dim=1).flatten()
    margin_after, margin_before = (served[0::2] - served[1::2]).mean(), (before[0::2] - before[1::2]).mean()
    # Measured: 1.9 nats before, 5.2 after 4 epochs (and val_rewards/accuracies 0.92), 32 steps over a base of 0 steps.
    assert margin_after > margin_before + 0.5, (margin_before, margin_after)
