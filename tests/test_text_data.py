"""Text data: documents from every supported file format, packing into equal windows with EOS after
each document, deterministic splits, the trained tokenizer and a saved one, config errors; labelled
texts for classification: files with string or integer labels, the bundled docstrings, WordPiece."""

import json

import pytest
import torch
from datasets import Dataset

from dlray.config import ConfigError, load_config
from dlray.data import SOURCES, build_data, data_config
from dlray.data.rows import SPLITS
from dlray.data.text import bundled_documents, pack, tokenize, train_tokenizer
from dlray.data.text_classification import STDLIB_PACKAGES
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


def read_all(keys: dict) -> list[dict]:
    """Every row the source of `keys` reads from its files, as the driver or a streamed task reads them."""
    cfg = data_config(keys)
    source = SOURCES[cfg.name]
    listing = source.list_rows(cfg, 0)
    return [row for path in listing.files for row in source.read(listing.filesystem, path, cfg, 0)]


def load_documents(path: str, text_field: str) -> list[str]:
    return [row["text"] for row in read_all({"name": "text", "path": path, "text_field": text_field})]


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


def test_a_malformed_line_in_memory_is_named_with_its_file_and_line(tmp_path):
    """As streamed (test_streaming): the same reader, so the same message, raised once where the data is built."""
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    with pytest.raises(ValueError, match=r"docs.jsonl, line 2: not valid JSON"):
        build_data(data_config(name="text", path=str(tmp_path / "docs.jsonl")), seed=0)


def test_packing_ends_documents_with_eos_and_overlaps_windows_by_one():
    eos = 0
    windows = pack([[1, 2, 3], [4, 5], [6]], eos, max_seq_len=3)  # stream 1 2 3 0 4 5 0 6 0
    assert windows.tolist() == [[1, 2, 3, 0], [0, 4, 5, 0]], "the tail, too short for a window, is dropped"
    assert len(pack([[1]], eos, max_seq_len=8)) == 0


def test_bundled_text_is_split_by_document_before_tokenizing_and_the_tokenizer_sees_training_documents_only():
    cfg = data_config(name="text", max_seq_len=32)
    data = build_data(cfg, seed=0)
    input_ids, labels = data.val.columns["input_ids"], data.val.columns["labels"]
    assert input_ids.shape[1] == 32 and torch.equal(input_ids[:, 1:], labels[:, :-1]), "labels are the inputs shifted by one"
    rows = SOURCES["text"].list_rows(cfg, 0).rows
    documents = {split: [row["text"] for row in rows if row["split"] == i] for i, split in enumerate(SPLITS)}
    assert sorted(sum(documents.values(), [])) == sorted(bundled_documents()) and all(documents.values())
    assert data.tokenizer.backend_tokenizer.to_str() == train_tokenizer(documents["train"], 2048).backend_tokenizer.to_str()
    assert data.tokenizer.backend_tokenizer.to_str() != train_tokenizer(bundled_documents(), 2048).backend_tokenizer.to_str()
    # The validation windows are the validation documents' tokens, packed: none comes from a training document.
    val_tokens = pack(tokenize(data.tokenizer, documents["val"]), data.info["eos_token_id"], 32)
    assert torch.equal(torch.cat([input_ids, labels[:, -1:]], 1), val_tokens)
    again = build_data(cfg, seed=0)
    assert torch.equal(again.val.columns["input_ids"], input_ids), "the same split for the same seed"
    assert not torch.equal(build_data(cfg, seed=1).val.columns["input_ids"], input_ids)
    assert data.info == {"vocab_size": 2048, "max_seq_len": 32, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_trained_tokenizer_is_deterministic_and_round_trips_any_text():
    first, second = train_tokenizer(DOCUMENTS * 20, 300), train_tokenizer(DOCUMENTS * 20, 300)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "Bytes nobody trained on: ÆØÅ, ∑ x², \t tabs and 👩‍💻."
    assert first.decode(first(text)["input_ids"]) == text
    assert (first.pad_token, first.bos_token, first.eos_token) == ("<pad>", "<s>", "</s>")


def test_saved_tokenizer_directory_is_used_as_is(tmp_path):
    trained = build_data(data_config(name="text", max_seq_len=32, vocab_size=512), seed=0)
    trained.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = build_data(data_config(name="text", max_seq_len=32, tokenizer=str(tmp_path / "tokenizer")), seed=0)
    assert loaded.info == trained.info and loaded.info["vocab_size"] == 512
    assert torch.equal(loaded.train.columns["input_ids"], trained.train.columns["input_ids"])


@pytest.mark.parametrize(
    "job, override, expected",
    [
        ("gpt_cpu", "data.image_size=16", "data.image_size applies only to image data (data.name 'digits' or 'image_folder'), got data.name 'text'"),
        ("gpt_cpu", "data.augment=false", "data.augment applies only to image data"),
        ("cnn_cpu", "data.max_seq_len=64", "data.max_seq_len applies only to text data or labelled text data or preference data (data.name 'text' or 'text_classification' or "
                                              "'preference'), got data.name 'digits'"),
        ("cnn_cpu", "data.tokenizer=tok", "data.tokenizer applies only to text data"),
        ("gpt_cpu", "data.label_field=stars",
         "data.label_field applies only to labelled text data or sequence data or preference data (data.name 'text_classification' or 'sequences' "
         "or 'preference'), got data.name 'text'"),
        ("bert_cpu", "data.channels=3", "data.channels applies only to image data (data.name 'digits' or 'image_folder'), got data.name 'text_classification'"),
        ("gpt_cpu", "data.tokenizer=tok data.vocab_size=512", "data.vocab_size sizes the tokenizer dlray trains, but data.tokenizer brings its own"),
        ("gpt_cpu", "data.vocab_size=100", "data.vocab_size: must be greater than or equal to 259, got 100"),
        ("cnn_cpu", "model.family=gpt", "model.family 'gpt' trains on text or preference data (data.name 'text' or 'preference'), got data.name 'digits', image data"),
        ("cnn_cpu", "data.name=text", "model.family 'cnn' trains on image data (data.name 'digits' or 'image_folder'), got data.name 'text', text data, "
                                      "which model.family 'gpt' trains on"),
        ("cnn_cpu", "model.family=vit data.name=text", "model.family 'vit' trains on image data (data.name 'digits' or 'image_folder'), got data.name 'text'"),
        ("cnn_cpu", "model.family=vit data.name=text_classification", "got data.name 'text_classification', labelled text data, which model.family 'bert' trains on"),
        ("cnn_cpu", "model.family=bert", "model.family 'bert' trains on labelled text data (data.name 'text_classification'), got data.name 'digits'"),
        ("gpt_cpu", "data.name=text_classification",
         "model.family 'gpt' trains on text or preference data (data.name 'text' or 'preference'), got data.name 'text_classification'"),
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


def load_labelled_texts(path: str, text_field: str, label_field: str) -> tuple[list[str], list]:
    rows = read_all({"name": "text_classification", "path": path, "text_field": text_field, "label_field": label_field})
    return [row["text"] for row in rows], [row["label"] for row in rows]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_labelled_texts_load_from_every_table_format(tmp_path, suffix):
    write_labelled(tmp_path, suffix, [5, 10, 5])
    assert load_labelled_texts(str(tmp_path), "body", "stars") == (DOCUMENTS, [5, 10, 5])
    with pytest.raises(ValueError, match="data.label_field 'label' is not a column"):
        load_labelled_texts(str(tmp_path), "body", "label")


def test_labelled_data_has_sorted_classes_and_padded_samples(tmp_path):
    """Integer labels are classes in numeric order (10 after 9, not after 1); strings sort as strings."""
    write_labelled(tmp_path, ".jsonl", [10, 9, 10])
    cfg = data_config(name="text_classification", path=str(tmp_path), text_field="body", label_field="stars", max_seq_len=10, vocab_size=300,
                      val_fraction=0.0, test_fraction=0.0)
    data = build_data(cfg, seed=0)
    assert data.info["class_names"] == ["9", "10"] and data.train.columns["label"].tolist() == [1, 0, 1]
    tokenizer = data.tokenizer
    (long, long_mask, label), (short, short_mask, _) = data.train[0], data.train[1]
    assert long.shape == long_mask.shape == (10,) and label == 1, "the label comes last: the loop counts samples by it"
    assert long[0] == tokenizer.cls_token_id and long[-1] == tokenizer.sep_token_id and long_mask.all(), "[CLS] text [SEP], cut to max_seq_len"
    assert short[-1] == tokenizer.pad_token_id and short_mask.tolist() == (short != tokenizer.pad_token_id).long().tolist(), "padded, masked"
    assert data.info == {"vocab_size": len(tokenizer), "pad_token_id": 0, "max_seq_len": 10, "class_names": ["9", "10"]}

    write_labelled(tmp_path, ".jsonl", ["positive", "negative", "positive"])
    assert build_data(cfg, seed=0).info["class_names"] == ["negative", "positive"]


def test_rows_without_a_text_or_label_and_txt_files_are_refused(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "fine", "label": "x"}, {"text": "no label", "label": None}]))
    with pytest.raises(ValueError, match="a.json, row 2: data.label_field 'label' holds None; a label must be a string or an integer"):
        load_labelled_texts(str(tmp_path / "a.json"), "text", "label")
    (tmp_path / "b.json").write_text(json.dumps([{"text": None, "label": "x"}]))
    with pytest.raises(ValueError, match="b.json, row 1: data.text_field 'text' holds None, not a text"):
        load_labelled_texts(str(tmp_path / "b.json"), "text", "label")
    (tmp_path / "c.txt").write_text("a document without a label")
    with pytest.raises(FileNotFoundError, match="data.path .* holds no .csv, .json, .jsonl, .parquet files"):
        load_labelled_texts(str(tmp_path / "c.txt"), "text", "label")


def test_bundled_docstrings_are_a_deterministic_dataset_with_every_class_in_every_split():
    cfg = data_config(name="text_classification", max_seq_len=32)
    data = build_data(cfg, seed=0)
    assert data.info["class_names"] == sorted(STDLIB_PACKAGES)
    labels = torch.cat([split.columns["label"] for split in (data.train, data.val, data.test)])
    assert len(labels) > 1500 and labels.bincount().min() >= 80, "every package documents enough functions and classes"
    assert data.test.columns["label"].bincount().min() >= 10, "every class is in the test split"
    again = build_data(cfg, seed=0)
    assert all(torch.equal(again.val.columns[k], data.val.columns[k]) for k in data.columns), "the same split and tokens for the same seed"
    assert not torch.equal(build_data(cfg, seed=1).val.columns["input_ids"], data.val.columns["input_ids"])


def test_wordpiece_tokenizer_is_deterministic_and_bert_shaped(tmp_path):
    first, second = train_wordpiece(DOCUMENTS * 20, 300), train_wordpiece(DOCUMENTS * 20, 300)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.convert_ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    encoded = first("A second, shorter one.")["input_ids"]
    assert first.convert_ids_to_tokens(encoded)[0] == "[CLS]" and first.convert_ids_to_tokens(encoded)[-1] == "[SEP]"
    assert first.decode(encoded, skip_special_tokens=True) == "a second, shorter one.", "lower-cased, as BERT's uncased models"
    first.save_pretrained(tmp_path / "tok")
    write_labelled(tmp_path, ".jsonl", ["a", "b", "a"])
    cfg = data_config(name="text_classification", path=str(tmp_path / "labelled.jsonl"), text_field="body", label_field="stars",
                      tokenizer=str(tmp_path / "tok"), max_seq_len=16, val_fraction=0.0, test_fraction=0.0)
    data = build_data(cfg, seed=0)
    assert data.info["vocab_size"] == len(first)
    assert data.train[0][0].tolist() == first(DOCUMENTS[0], padding="max_length", truncation=True, max_length=16)["input_ids"]
