"""Text data: documents from every supported file format, packing into equal windows with EOS after
each document, deterministic splits, the trained tokenizer and a saved one, config errors."""

import json

import pytest
import torch
from datasets import Dataset

from conftest import REPO
from dlray.config import ConfigError, DataConfig, load_config
from dlray.data import build_data
from dlray.data.text import TokenWindows, bundled_documents, load_documents, pack, tokenize, train_tokenizer

DOCUMENTS = ["The first document.\nIt has two lines.", "A second, shorter one.", "Unicode too: naïve café, 東京, 🙂."]


def write_documents(directory, suffix: str, field: str = "text"):
    """DOCUMENTS as one file of the given format (a .txt file holds one document, so three files)."""
    directory.mkdir(exist_ok=True)
    if suffix == ".txt":
        for i, text in enumerate(DOCUMENTS):
            (directory / f"{i}.txt").write_text(text)
        return
    table = Dataset.from_dict({field: DOCUMENTS, "id": list(range(len(DOCUMENTS)))})
    path = str(directory / f"docs{suffix}")
    {".jsonl": lambda: table.to_json(path), ".parquet": lambda: table.to_parquet(path), ".csv": lambda: table.to_csv(path, index=False)}[suffix]()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", ".csv"])
def test_every_format_loads_its_documents(tmp_path, suffix):
    write_documents(tmp_path, suffix, field="body")
    assert load_documents(str(tmp_path), text_field="body") == DOCUMENTS


def test_a_folder_of_mixed_formats_and_a_single_file(tmp_path):
    write_documents(tmp_path / "a", ".jsonl")
    write_documents(tmp_path / "a", ".txt")
    assert sorted(load_documents(str(tmp_path), "text")) == sorted(DOCUMENTS * 2)
    (tmp_path / "one.json").write_text(json.dumps([{"text": "only this"}, {"text": ""}]))
    assert load_documents(str(tmp_path / "one.json"), "text") == ["only this"], "empty texts are dropped"


def test_missing_column_and_unknown_files_name_the_key(tmp_path):
    write_documents(tmp_path, ".jsonl")
    with pytest.raises(ValueError, match="data.text_field 'body' is not a column"):
        load_documents(str(tmp_path), "body")
    (tmp_path / "notes.md").write_text("# not a corpus")
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_documents(str(tmp_path / "notes.md"), "text")


def test_packing_ends_documents_with_eos_and_overlaps_windows_by_one():
    eos = 0
    windows = pack([[1, 2, 3], [4, 5], [6]], eos, max_seq_len=3)  # stream 1 2 3 0 4 5 0 6 0
    assert windows.tolist() == [[1, 2, 3, 0], [0, 4, 5, 0]], "the tail, too short for a window, is dropped"
    input_ids, labels = TokenWindows(windows)[1]
    assert input_ids.tolist() == [0, 4, 5] and labels.tolist() == [4, 5, 0], "labels are the inputs shifted by one"
    assert len(pack([[1]], eos, max_seq_len=8)) == 0


def test_bundled_text_splits_are_equal_windows_disjoint_and_deterministic():
    cfg = DataConfig(name="text", max_seq_len=32)
    data = build_data(cfg, seed=0)
    splits = [data.train.windows, data.val.windows, data.test.windows]
    assert all(w.shape[1] == 33 for w in splits)
    total = sum(len(w) for w in splits)
    assert total > 3000 and abs(len(data.test) - 0.2 * total) <= 1 and abs(len(data.val) - 0.1 * total) <= 1
    assert (torch.cat(splits) == data.info["eos_token_id"]).sum() >= 70, "one EOS per help topic"
    assert total == len(pack(tokenize(data.tokenizer, bundled_documents()), data.info["eos_token_id"], 32)), "each window in one split"
    again = build_data(cfg, seed=0)
    assert torch.equal(again.val.windows, data.val.windows), "every worker builds the same split"
    assert not torch.equal(build_data(cfg, seed=1).val.windows, data.val.windows)
    assert data.info == {"vocab_size": 2048, "max_seq_len": 32, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_trained_tokenizer_is_deterministic_and_round_trips_any_text():
    first, second = train_tokenizer(DOCUMENTS * 20, 300), train_tokenizer(DOCUMENTS * 20, 300)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "Bytes nobody trained on: ÆØÅ, ∑ x², \t tabs and 👩‍💻."
    assert first.decode(first(text)["input_ids"]) == text
    assert (first.pad_token, first.bos_token, first.eos_token) == ("<pad>", "<s>", "</s>")


def test_saved_tokenizer_directory_is_used_as_is(tmp_path):
    trained = build_data(DataConfig(name="text", max_seq_len=32, vocab_size=512), seed=0)
    trained.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = build_data(DataConfig(name="text", max_seq_len=32, tokenizer=str(tmp_path / "tokenizer")), seed=0)
    assert loaded.info == trained.info and loaded.info["vocab_size"] == 512
    assert torch.equal(loaded.train.windows, trained.train.windows)


@pytest.mark.parametrize(
    "job, override, expected",
    [
        ("gpt_cpu", "data.image_size=16", "data.image_size applies only to image data (data.name 'digits' or 'image_folder'), got data.name 'text'"),
        ("gpt_cpu", "data.augment=false", "data.augment applies only to image data"),
        ("cnn_cpu", "data.max_seq_len=64", "data.max_seq_len applies only to text data (data.name 'text'), got data.name 'digits'"),
        ("cnn_cpu", "data.tokenizer=tok", "data.tokenizer applies only to text data"),
        ("gpt_cpu", "data.tokenizer=tok data.vocab_size=512", "data.vocab_size sizes the tokenizer dlray trains, but data.tokenizer brings its own"),
        ("gpt_cpu", "data.vocab_size=100", "data.vocab_size: must be greater than or equal to 259, got 100"),
        ("cnn_cpu", "model.family=gpt", "model.family 'gpt' trains on text: it needs data.name 'text', got data.name 'digits'"),
        ("cnn_cpu", "data.name=text", "data.name 'text' needs a language model: model.family must be one of ['gpt'], got 'cnn'"),
        ("cnn_cpu", "train.gradient_checkpointing=true", "train.gradient_checkpointing is not supported by model.family 'cnn' (only by ['gpt'])"),
        ("gpt_cpu", "train.metric=val_accuracy", "train.metric must be one of ['train_loss', 'val_loss', 'epoch', 'val_perplexity', 'tokens_per_sec']"),
    ],
)
def test_bad_text_config_names_the_key(job, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / f"jobs/debug/{job}.yaml", override.split())
    assert expected in str(err.value)


def test_text_job_takes_perplexity_and_gradient_checkpointing():
    cfg = load_config(REPO / "jobs/debug/gpt_cpu.yaml", ["train.metric=val_perplexity", "train.gradient_checkpointing=true"])
    assert cfg.train.metric == "val_perplexity" and cfg.train.gradient_checkpointing
