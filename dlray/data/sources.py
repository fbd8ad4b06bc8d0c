"""Files as a streaming pipeline reads them: listing (local paths, globs and URIs alike), the rule
that decides whether a source streams, a split that needs no pass over the data, and rows parsed
out of one file with errors that name the file and line. No Ray here: dlray.streaming runs these
inside Ray Data operators.
"""

from __future__ import annotations

import fnmatch
import io
import json
import zlib
from pathlib import Path, PurePosixPath

import pyarrow.fs

# A local path whose files hold more than this streams (data.streaming: null); smaller ones load in
# memory, where splits are exact and stratified. A URI always streams.
STREAM_ABOVE_BYTES = 1 << 30
SPLITS = ("train", "val", "test")
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # text files: suffix -> `datasets` builder


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


def parse_rows(path: str, data: bytes, fields: tuple[str, ...], described: str) -> list[dict]:
    """The rows of one file: .jsonl (a JSON object per line), .json (a list of objects), .csv,
    .parquet, or .txt (one row: its whole text under every field). Each row must hold one of `fields`."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".txt":
        return [dict.fromkeys(fields, data.decode("utf-8", errors="replace"))]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                rows.append(json_row(line, f"{path}, line {number}"))
    elif suffix == ".json":
        rows = json.loads(data)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: a .json file must hold a list of objects")
    elif suffix == ".csv":
        import pyarrow.csv

        rows = pyarrow.csv.read_csv(io.BytesIO(data)).to_pylist()
    else:
        import pyarrow.parquet

        rows = pyarrow.parquet.read_table(io.BytesIO(data)).to_pylist()
    for number, row in enumerate(rows, 1):
        if not set(fields) & row.keys():
            raise ValueError(f"{path}, row {number}: {described} is not a column; it has {sorted(row)}")
    return rows


def json_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON object per line is expected, got {type(row).__name__}")
    return row
