"""Rows as the driver lists them and a file's reader parses them: files (local paths, globs and URIs
alike), the rule that decides whether a source streams, the splits (a hash of a row's key, which
needs no pass over the data, or stratified by label for rows listed with their labels), and rows
parsed out of one file with errors that name the file and line. No Ray here: in memory these run in
this process, streamed inside Ray Data operators (dlray.streaming).
"""

from __future__ import annotations

import fnmatch
import io
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pyarrow.fs
import torch

# A local path whose files hold more than this streams (data.streaming: null); smaller ones load in
# memory, where splits are exact and stratified. A URI always streams.
STREAM_ABOVE_BYTES = 1 << 30
SPLITS = ("train", "val", "test")
TABLE_BATCH_ROWS = 1024  # rows of a .parquet or .csv file read at once
TEXT_SUFFIXES = frozenset({".txt", ".jsonl", ".json", ".parquet", ".csv"})  # what read_rows reads


def is_uri(path: str) -> bool:
    return "://" in path


def list_files(path: str, suffixes) -> tuple[pyarrow.fs.FileSystem, list[pyarrow.fs.FileInfo]]:
    """The files under `path` (a file, a folder searched recursively, or a glob such as
    `shards/*.parquet`; local or a URI such as s3://bucket/data) whose suffix is in `suffixes`, sorted."""
    glob_at = min((path.find(char) for char in "*?[" if char in path), default=-1)
    slash = path.rfind("/", 0, glob_at) if glob_at >= 0 else len(path)
    base = path[:slash] if slash > 0 else "."
    if is_uri(base):
        filesystem, root = pyarrow.fs.FileSystem.from_uri(base)
    else:
        filesystem, root = pyarrow.fs.LocalFileSystem(), str(Path(base).expanduser().resolve())
    info = filesystem.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    infos = [info] if info.type == pyarrow.fs.FileType.File else filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    pattern = path[slash + 1 :] if glob_at >= 0 else None
    files = [f for f in infos if f.type == pyarrow.fs.FileType.File and PurePosixPath(f.path).suffix.lower() in suffixes
             and (pattern is None or globbed(f.path[len(root) + 1 :], pattern))]
    if not files:
        raise FileNotFoundError(f"data.path {path!r} holds no {', '.join(sorted(suffixes))} files")
    return filesystem, sorted(files, key=lambda f: f.path)


def globbed(relative: str, pattern: str) -> bool:
    """Shell-style: `*` stays within a folder, `**` crosses folders."""
    return fnmatch.fnmatch(relative, pattern) and ("**" in pattern or relative.count("/") == pattern.count("/"))


def streams(path: str | None, streaming: bool | None, suffixes) -> bool:
    """The rule: data.streaming if set; else a URI streams, and a local path streams when its files hold more than STREAM_ABOVE_BYTES."""
    if streaming is not None:
        return streaming
    if path is None:
        return False
    return is_uri(path) or sum(f.size for f in list_files(path, suffixes)[1]) > STREAM_ABOVE_BYTES


def split_of(key: str, val_fraction: float, test_fraction: float, seed: int) -> int:
    """The split (an index into SPLITS) of a row, from a hash of its key (a file path, a text): the
    same on every node and in every epoch, with no pass over the data, so a row never moves between splits."""
    u = zlib.crc32(f"{seed}:{key}".encode()) / 2**32
    return 2 if u < test_fraction else 1 if u < test_fraction + val_fraction else 0


def split_indices(labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int):
    """Stratified train/val/test split of rows listed with their labels, the same in every process for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    train, val, test = [], [], []
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)].tolist()
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        test += idx[:n_test]
        val += idx[n_test : n_test + n_val]
        train += idx[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


def read_rows(filesystem: pyarrow.fs.FileSystem, path: str, fields: tuple[str, ...], described: str,
              validate: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """The rows of one file, read as they are yielded: .jsonl (a JSON object per line) a line at a
    time, .csv and .parquet a record batch at a time, so that a file larger than a task's memory
    streams through it; .json (a list of objects) and .txt (one row: its whole text under every
    field) whole. Each row must hold one of `fields` (`described` says which in errors), and pass `validate`
    (which raises ValueError saying what is wrong; the error names the file and line or row)."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in (".txt", ".json"):
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
        if suffix == ".txt":
            yield dict.fromkeys(fields, data.decode("utf-8", errors="replace"))
            return
        rows = json.loads(data)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: a .json file must hold a list of objects")
        for number, row in enumerate(rows, 1):
            yield checked(row, fields, described, f"{path}, row {number}", validate)
    elif suffix == ".jsonl":
        number = 0
        with filesystem.open_input_stream(path) as stream:
            try:
                for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
                    if line.strip():
                        yield checked(json_row(line, f"{path}, line {number}"), fields, described, f"{path}, line {number}", validate)
            except UnicodeDecodeError as err:  # decoded a chunk ahead of the lines taken: the byte is past line `number`
                raise ValueError(f"{path}, after line {number}: not UTF-8 text ({err.reason})") from None
    else:
        yield from table_rows(filesystem, path, fields, described, validate)


def table_rows(filesystem: pyarrow.fs.FileSystem, path: str, fields: tuple[str, ...], described: str,
               validate: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """A .csv or .parquet file's rows, TABLE_BATCH_ROWS at a time; its columns checked once, before any row."""
    import pyarrow.csv
    import pyarrow.parquet

    csv = path.lower().endswith(".csv")
    with filesystem.open_input_stream(path) if csv else filesystem.open_input_file(path) as source:
        reader = pyarrow.csv.open_csv(source) if csv else pyarrow.parquet.ParquetFile(source)
        names = reader.schema.names if csv else reader.schema_arrow.names
        if not set(fields) & set(names):
            raise ValueError(f"{path}: {described} is not a column; it has {sorted(names)}")
        number = 0
        for batch in reader if csv else reader.iter_batches(batch_size=TABLE_BATCH_ROWS):
            if validate is None:
                yield from batch.to_pylist()
                continue
            for number, row in enumerate(batch.to_pylist(), number + 1):
                yield checked(row, fields, described, f"{path}, row {number}", validate)


def checked(row: dict, fields: tuple[str, ...], described: str, where: str, validate: Callable[[dict], None] | None = None) -> dict:
    if not set(fields) & row.keys():
        raise ValueError(f"{where}: {described} is not a column; it has {sorted(row)}")
    if validate is not None:
        try:
            validate(row)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return row


def json_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON object per line is expected, got {type(row).__name__}")
    return row
