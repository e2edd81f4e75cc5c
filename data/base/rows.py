"""Reading the rows of a data set: a local .csv, .json, .jsonl, .jsonl.gz or .parquet file, or a hub split."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from twophase.data.base import hub
from twophase.data.base.errors import UserError


def read_rows(source: str | None, dataset_id: str, split: str, **hub_kwargs) -> list[dict]:
    """Rows of a local file (.csv, .json, .jsonl) or, when source is None or a hub id, of a hub split."""
    if source and Path(source).expanduser().exists():
        return read_local_file(Path(source).expanduser())
    dataset = hub.load_hub_dataset(source or dataset_id, split, **hub_kwargs)
    return [dict(row) for row in dataset]


def read_local_file(path: Path) -> list[dict]:
    """Rows of a .csv, .json (a list of rows), .jsonl, .jsonl.gz or .parquet file (the hub's own storage format)."""
    suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".jsonl.gz") else path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet  # comes with `datasets`

        return pyarrow.parquet.read_table(path).to_pylist()
    if suffix == ".jsonl.gz":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(text)
        return data if isinstance(data, list) else data.get("data", data.get("rows", []))
    raise UserError(f"cannot read {path}: expected a .csv, .json, .jsonl, .jsonl.gz or .parquet file")
