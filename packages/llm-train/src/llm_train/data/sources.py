"""Document sources: each returns a list-like of text documents (random access, for grain)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from llm_core import ConfigError


class DataError(ValueError):
    """A data problem, naming the key / file / field at fault and what to do."""


def _files(pattern: str, what: str) -> list[str]:
    if not pattern:
        raise ConfigError(f"dataset_kind={what} needs dataset_path (a file, folder or glob).")
    if os.path.isdir(pattern):
        files = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
    else:
        files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise DataError(
            f"dataset_path={pattern!r} matches no files: check the path or glob "
            "(use ** with a folder for recursive matches)."
        )
    return files


class TextFiles:
    """One document per text file (read lazily)."""

    def __init__(self, pattern: str):
        self.files = _files(pattern, "text")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        with open(self.files[i], encoding="utf-8", errors="replace") as f:
            return f.read()


def _field(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise DataError(
            f"{where}: record has no field {field!r} (fields: {sorted(record)[:10]}); "
            "set dataset_field to the text field."
        )
    return str(record[field])


def jsonl_docs(pattern: str, field: str) -> list[str]:
    docs = []
    for path in _files(pattern, "jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n} is not valid JSON: {err}") from None
                    docs.append(_field(record, field, f"{path}:{n}"))
    return docs


def parquet_docs(pattern: str, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise DataError(
            "dataset_kind=parquet needs pyarrow: pip install 'llm-train[data]'"
        ) from None
    docs: list[str] = []
    for path in _files(pattern, "parquet"):
        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(
                f"{path}: no column {field!r} (columns: {table.column_names}); set dataset_field."
            )
        docs.extend(str(x) for x in table.column(field).to_pylist())
    return docs


class ArrayRecordDocs:
    """ArrayRecord files; a record is UTF-8 text or a JSON object holding `dataset_field`."""

    def __init__(self, pattern: str, field: str):
        import grain

        self.field = field
        self.source = grain.sources.ArrayRecordDataSource(_files(pattern, "arrayrecord"))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        raw = self.source[i]
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        if text.startswith("{"):
            try:
                return _field(json.loads(text), self.field, f"arrayrecord record {i}")
            except json.JSONDecodeError:
                pass
        return text


def load_hf_dataset(path: str, split: str):
    """A Hugging Face dataset split from a `save_to_disk` folder or local data files."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise DataError("dataset_kind=hf needs `datasets`: pip install 'llm-train[data]'") from None
    if not path or not os.path.exists(path):
        raise DataError(f"dataset_path={path!r} does not exist (dataset_kind=hf).")
    if os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json"))
        or os.path.exists(os.path.join(path, "dataset_dict.json"))
    ):
        ds = datasets.load_from_disk(path)
    else:
        files = _files(path, "hf")
        ext = Path(files[0]).suffix.lstrip(".")
        builder = {"jsonl": "json", "txt": "text"}.get(ext, ext)
        ds = datasets.load_dataset(builder, data_files=files)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset_split={split!r} not in {path} (splits: {list(ds)}).")
        ds = ds[split]
    return ds


class HFDocs:
    """The text field of a Hugging Face dataset (see `load_hf_dataset`)."""

    def __init__(self, path: str, field: str, split: str):
        ds = load_hf_dataset(path, split)
        if field not in ds.column_names:
            raise DataError(
                f"{path}: no column {field!r} (columns: {ds.column_names}); set dataset_field."
            )
        self.ds, self.field = ds, field

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:
        return str(self.ds[int(i)][self.field])


def open_documents(kind: str, path: str, field: str, split: str = "train"):
    if kind == "text":
        docs = TextFiles(path)
    elif kind == "jsonl":
        docs = jsonl_docs(path, field)
    elif kind == "parquet":
        docs = parquet_docs(path, field)
    elif kind == "arrayrecord":
        docs = ArrayRecordDocs(path, field)
    elif kind == "hf":
        docs = HFDocs(path, field, split)
    else:
        raise ConfigError(f"dataset_kind={kind!r} has no document source.")
    if len(docs) == 0:
        raise DataError(f"dataset_path={path!r} (dataset_kind={kind}) holds no documents.")
    return docs
