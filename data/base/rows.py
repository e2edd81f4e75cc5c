"""Reading the rows of a data set, the one reader every data set goes through (DPO, GRPO, the benchmarks).

A local file is .jsonl or .jsonl.gz (JSON lines), .json or .json.gz (a list of rows,
or JSON lines), .csv (with a header) or .parquet (the hub's own storage format);
anything else is a hub dataset id, read by data/base/hub.py. A JSON line that does
not parse is not fatal: it comes through as `MALFORMED_LINE`, so that each loader
counts it, under the one reason `MALFORMED_JSON`, among the rows it skipped.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterator

from twophase.data.base import hub
from twophase.data.base.errors import UserError

MALFORMED_JSON = "malformed JSON"  # the skip reason of a line that is not JSON, in every load report
MALFORMED_LINE = object()  # stands in for such a line among the rows
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet")


def read_file_rows(path: Path) -> Iterator:
    """The rows of a local file, one at a time (`MALFORMED_LINE` for a JSON line that does not parse)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(SUFFIXES):
        raise UserError(f"cannot read {path}: expected a {', '.join(SUFFIXES)} file")
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet  # comes with `datasets`

            yield from pyarrow.parquet.read_table(path).to_pylist()
            return
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            if name.endswith(".csv"):
                yield from (dict(row) for row in csv.DictReader(handle))
            elif name.endswith((".json", ".json.gz")):
                yield from _json_rows(path, handle.read())
            else:
                yield from _json_lines(handle)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read '{path}': {err}. Check that it is an intact UTF-8 file.") from None


def _json_lines(lines) -> Iterator:
    for line in lines:
        if line.strip():  # blank lines are not rows
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield MALFORMED_LINE


def _json_rows(path: Path, text: str) -> list:
    """A .json file's rows: a list, or {"data" | "rows": list}; JSON lines under a .json name are read as such."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values: JSON lines
            return list(_json_lines(text.splitlines()))
        raise UserError(f"cannot read '{path}' as JSON ({err}); pass a JSON list of rows or a .jsonl file") from None
    if isinstance(rows, dict) and isinstance(rows.get("data", rows.get("rows")), list):
        rows = rows.get("data", rows.get("rows"))
    if not isinstance(rows, list):
        raise UserError(f"'{path}' holds a JSON {type(rows).__name__}, not a list of rows; pass a list or a .jsonl file")
    return rows


def read_local_file(path: Path) -> list[dict]:
    """Every row of a local file; a line that is not JSON is an error here (benchmark files are not skipped from)."""
    rows = list(read_file_rows(Path(path)))
    if any(row is MALFORMED_LINE for row in rows):
        raise UserError(f"{path}: a line is not JSON; benchmark files must be intact")
    return rows


def read_rows(source: str | None, dataset_id: str, split: str, **hub_kwargs) -> list[dict]:
    """Rows of a local file or, when source is None or a hub id, of a hub split."""
    if source and Path(source).expanduser().exists():
        return read_local_file(Path(source).expanduser())
    dataset = hub.load_hub_dataset(source or dataset_id, split, **hub_kwargs)
    return [dict(row) for row in dataset]


def describe_skips(report: dict) -> str:
    """One line for a log, e.g. "used 2,303 of 2,312 rows; skipped 5 ..., 4 empty chosen response"."""
    skipped = report.get("skipped") or {}
    head = f"used {report['used']:,} of {report['rows']:,} rows"
    if not skipped:
        return head + "; skipped none"
    parts = [f"{count:,} {reason}" for reason, count in skipped.items()]
    return head + "; skipped " + ", ".join(parts)
