"""Text data: documents from every supported file format, packing into equal windows with EOS after
each document, deterministic splits, the trained tokenizer and a saved one, config errors; labelled
texts for classification: files with string or integer labels, the bundled docstrings, WordPiece."""

import json

import pytest
import torch
from datasets import Dataset

from dlray.config import ConfigError, DataConfig, load_config
from dlray.data import build_data
from dlray.data.text import TokenWindows, bundled_documents, load_documents, pack, tokenize, train_tokenizer
from dlray.data.text_classification import STDLIB_PACKAGES, load_labelled_texts
from dlray.data.text_classification import train_tokenizer as train_wordpiece

from helpers import REPO

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
        ("cnn_cpu", "data.max_seq_len=64", "data.max_seq_len applies only to text data (data.name 'text' or 'text_classification'), got data.name 'digits'"),
        ("cnn_cpu", "data.tokenizer=tok", "data.tokenizer applies only to text data"),
        ("gpt_cpu", "data.label_field=stars", "data.label_field applies only to text classification data (data.name 'text_classification'), got data.name 'text'"),
        ("bert_cpu", "data.channels=3", "data.channels applies only to image data (data.name 'digits' or 'image_folder'), got data.name 'text_classification'"),
        ("gpt_cpu", "data.tokenizer=tok data.vocab_size=512", "data.vocab_size sizes the tokenizer dlray trains, but data.tokenizer brings its own"),
        ("gpt_cpu", "data.vocab_size=100", "data.vocab_size: must be greater than or equal to 259, got 100"),
        ("cnn_cpu", "model.family=gpt", "model.family 'gpt' trains on text: it needs data.name 'text', got data.name 'digits'"),
        ("cnn_cpu", "data.name=text", "data.name 'text' needs a language model: model.family must be one of ['gpt'], got 'cnn'"),
        ("cnn_cpu", "model.family=vit data.name=text", "data.name 'text' needs a language model: model.family must be one of ['gpt'], got 'vit'"),
        ("cnn_cpu", "model.family=vit data.name=text_classification", "data.name 'text_classification' needs a text classifier: model.family must be one of ['bert'], got 'vit'"),
        ("cnn_cpu", "model.family=bert", "model.family 'bert' trains on text: it needs data.name 'text_classification', got data.name 'digits'"),
        ("gpt_cpu", "data.name=text_classification", "model.family 'gpt' trains on text: it needs data.name 'text', got data.name 'text_classification'"),
        ("bert_cpu", "model.name_or_path=bert-base-uncased data.vocab_size=512", "model.name_or_path brings its own: drop data.vocab_size"),
        ("cnn_cpu", "train.gradient_checkpointing=true", "train.gradient_checkpointing is not supported by model.family 'cnn' (only by ['gpt', 'vit', 'bert'])"),
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


def write_labelled(directory, suffix: str, labels: list) -> None:
    table = Dataset.from_dict({"body": DOCUMENTS, "stars": labels})
    path = str(directory / f"labelled{suffix}")
    {".jsonl": lambda: table.to_json(path), ".parquet": lambda: table.to_parquet(path), ".csv": lambda: table.to_csv(path, index=False)}[suffix]()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_labelled_texts_load_from_every_table_format(tmp_path, suffix):
    write_labelled(tmp_path, suffix, [5, 10, 5])
    assert load_labelled_texts(str(tmp_path), "body", "stars") == (DOCUMENTS, [5, 10, 5])
    with pytest.raises(ValueError, match="data.label_field 'label' is not a column"):
        load_labelled_texts(str(tmp_path), "body", "label")


def test_labelled_data_has_sorted_classes_and_padded_samples(tmp_path):
    """Integer labels are classes in numeric order (10 after 9, not after 1); strings sort as strings."""
    write_labelled(tmp_path, ".jsonl", [10, 9, 10])
    cfg = DataConfig(name="text_classification", path=str(tmp_path), text_field="body", label_field="stars", max_seq_len=10, vocab_size=300,
                     val_fraction=0.0, test_fraction=0.0)
    data = build_data(cfg, seed=0)
    assert data.class_names == ["9", "10"] and data.train.tensors[2].tolist() == [1, 0, 1]
    tokenizer = data.tokenizer
    (long, long_mask, label), (short, short_mask, _) = data.train[0], data.train[1]
    assert long.shape == long_mask.shape == (10,) and label == 1, "the label comes last: the loop counts samples by it"
    assert long[0] == tokenizer.cls_token_id and long[-1] == tokenizer.sep_token_id and long_mask.all(), "[CLS] text [SEP], cut to max_seq_len"
    assert short[-1] == tokenizer.pad_token_id and short_mask.tolist() == (short != tokenizer.pad_token_id).long().tolist(), "padded, masked"
    assert data.info == {"vocab_size": len(tokenizer), "pad_token_id": 0, "max_seq_len": 10, "class_names": ["9", "10"]}

    write_labelled(tmp_path, ".jsonl", ["positive", "negative", "positive"])
    assert build_data(cfg, seed=0).class_names == ["negative", "positive"]


def test_rows_without_a_text_or_label_and_txt_files_are_refused(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "fine", "label": "x"}, {"text": "no label", "label": None}]))
    with pytest.raises(ValueError, match="data.label_field 'label': row 1 of .* holds None; a label must be a string or an integer"):
        load_labelled_texts(str(tmp_path / "a.json"), "text", "label")
    (tmp_path / "b.json").write_text(json.dumps([{"text": None, "label": "x"}]))
    with pytest.raises(ValueError, match="data.text_field 'text': row 0 of .* has no text"):
        load_labelled_texts(str(tmp_path / "b.json"), "text", "label")
    (tmp_path / "c.txt").write_text("a document without a label")
    with pytest.raises(FileNotFoundError, match="data.path .* must be a .jsonl, .json, .parquet, .csv file"):
        load_labelled_texts(str(tmp_path / "c.txt"), "text", "label")


def test_bundled_docstrings_are_a_deterministic_stratified_dataset():
    cfg = DataConfig(name="text_classification", max_seq_len=32)
    data = build_data(cfg, seed=0)
    assert data.class_names == sorted(STDLIB_PACKAGES)
    labels = torch.cat([split.tensors[2] for split in (data.train, data.val, data.test)])
    assert len(labels) > 1500 and labels.bincount().min() >= 80, "every package documents enough functions and classes"
    assert data.test.tensors[2].bincount().min() >= 15, "every class is in the test split"
    again = build_data(cfg, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again.val.tensors, data.val.tensors)), "every worker builds the same split and tokens"
    assert not torch.equal(build_data(cfg, seed=1).val.tensors[0], data.val.tensors[0])


def test_wordpiece_tokenizer_is_deterministic_and_bert_shaped(tmp_path):
    first, second = train_wordpiece(DOCUMENTS * 20, 300), train_wordpiece(DOCUMENTS * 20, 300)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.convert_ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    encoded = first("A second, shorter one.")["input_ids"]
    assert first.convert_ids_to_tokens(encoded)[0] == "[CLS]" and first.convert_ids_to_tokens(encoded)[-1] == "[SEP]"
    assert first.decode(encoded, skip_special_tokens=True) == "a second, shorter one.", "lower-cased, as BERT's uncased models"
    first.save_pretrained(tmp_path / "tok")
    write_labelled(tmp_path, ".jsonl", ["a", "b", "a"])
    cfg = DataConfig(name="text_classification", path=str(tmp_path / "labelled.jsonl"), text_field="body", label_field="stars",
                     tokenizer=str(tmp_path / "tok"), max_seq_len=16, val_fraction=0.0, test_fraction=0.0)
    data = build_data(cfg, seed=0)
    assert data.info["vocab_size"] == len(first)
    assert data.train[0][0].tolist() == first(DOCUMENTS[0], padding="max_length", truncation=True, max_length=16)["input_ids"]
