"""Datasets of {prompt, answer} records: JSONL / JSON, Parquet, CSV, or `datasets.load_dataset` on local files.

Every record is checked as it is read; the first bad one stops the load with a `DataError` whose message is
one line naming the file and line (CSV/JSON: the line the record starts on; Parquet and `datasets`: the
1-based row) and what is wrong. Nothing is skipped, except blank lines in JSONL, which are not records.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stablerl.errors import UserError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # reference answer the verifier compares with (rewards.verify), or a task-specific spec
    traces: dict[str, str] = field(default_factory=dict)  # style -> full SFT response, ending in the answer
    meta: dict = field(default_factory=dict)  # the record's other fields; for built-in tasks: task, key


class DataError(UserError):
    """A bad data file or record. str() is one line: `path:line: what is wrong`."""


def _where(path: Path, line: int | str) -> str:
    return f"{path}:{line}"


def _text(value, key: str, at: str) -> str:
    # JSON numbers are fine as answers ("answer": 72); anything structured is a mistake in the mapping.
    if isinstance(value, str):
        text = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        text = str(value)
    else:
        raise DataError(f"{at}: field {key!r} must be a string or number, got {type(value).__name__} "
                        f"{_short(value)}")
    if not text.strip():
        raise DataError(f"{at}: field {key!r} is empty")
    return text


def _short(value) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def to_example(record, prompt_key: str, answer_key: str, at: str) -> Example:
    """One record (a dict) as an Example; `at` is the `file:line` used in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{at}: record must be an object with fields, got {type(record).__name__} {_short(record)}")
    for key in (prompt_key, answer_key):
        if key not in record or record[key] is None:
            present = ", ".join(str(k) for k in record if record[k] is not None) or "none"
            what = "missing" if key not in record else "null"
            raise DataError(f"{at}: field {key!r} {what} (fields present: {present})")
    traces = record.get("traces") or {}
    if not isinstance(traces, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in traces.items()):
        raise DataError(f"{at}: field 'traces' must map style names to strings, got {_short(traces)}")
    meta = {k: v for k, v in record.items() if k not in (prompt_key, answer_key, "traces")}
    return Example(_text(record[prompt_key], prompt_key, at), _text(record[answer_key], answer_key, at),
                   dict(traces), meta)


# ---- readers: each yields (line, record) -----------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{_where(path, n)}: not UTF-8 text ({e.reason} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{_where(path, n)}: invalid JSON: {e.msg} (column {e.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[int, object]]:
    """A JSON array of records, with each record's starting line; anything else is read as JSON lines."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        yield from _read_jsonl(path)
        return
    decoder, i = json.JSONDecoder(), start + 1

    def skip(i: int) -> int:
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    def fail(i: int, msg: str):
        return DataError(f"{_where(path, text.count(chr(10), 0, i) + 1)}: invalid JSON: {msg}")

    i = skip(i)
    if text[i : i + 1] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        yield text.count("\n", 0, i) + 1, record
        i = skip(end)
        if text[i : i + 1] == "]":
            if text[skip(i + 1) :]:
                raise fail(skip(i + 1), "extra data after the array")
            return
        if text[i : i + 1] != ",":
            raise fail(i, "expected ',' or ']' between records")
        i = skip(i + 1)


_EXTRA = "\0extra"  # DictReader key for fields beyond the header


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, object]]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA)
    header = reader.fieldnames
    if not header:
        return
    for key in required:
        if key not in header:
            raise DataError(f"{_where(path, 1)}: column {key!r} missing (columns: {', '.join(header)})")
    start = reader.line_num + 1  # a quoted field may span lines: report the line the row starts on
    for row in reader:
        if _EXTRA in row:
            raise DataError(f"{_where(path, start)}: {len(header) + len(row[_EXTRA])} fields but the header has "
                            f"{len(header)}")
        # DictReader fills absent trailing fields with None: a short row, reported as missing fields.
        yield start, {k: v for k, v in row.items() if v is not None}
        start = reader.line_num + 1


def _read_parquet(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet: {' '.join(str(e).split())}") from None
    for key in required:
        if key not in table.column_names:
            raise DataError(f"{path}: column {key!r} missing (columns: {', '.join(table.column_names)})")
    for n, row in enumerate(table.to_pylist(), start=1):
        yield f"row {n}", row


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = data[: e.start].count(b"\n") + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{_where(path, line)}: not UTF-8 text ({e.reason} at column {column})") from None


READERS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_examples(path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer",
                  split: str | None = None) -> list[Example]:
    """Examples from a .jsonl/.json, .parquet or .csv file (by extension), mapping `prompt_key` and
    `answer_key` to Example.prompt/answer. A directory is handed to `datasets.load_dataset` with `split`.
    A single file is one split: `split` must be None or "train" (the name `datasets` gives it)."""
    path = Path(path)
    if path.is_dir():
        return load_hf(path, split or "train", prompt_key, answer_key)
    if not path.exists():
        raise DataError(f"{path}: cannot read: no such file")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (use {', '.join(READERS)})")
    if split not in (None, "train"):
        raise DataError(f"{path}: a single file has only the 'train' split, not {split!r}")
    required = (prompt_key, answer_key)
    try:
        if kind == "jsonl":
            rows: Iterable = _read_jsonl(path)
        elif kind == "json":
            rows = _read_json(path)
        elif kind == "csv":
            rows = _read_csv(path, required)
        else:
            rows = _read_parquet(path, required)
        examples = [to_example(rec, prompt_key, answer_key, _where(path, n)) for n, rec in rows]
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not examples:
        raise DataError(f"{path}: no records" + (" (empty file)" if path.stat().st_size == 0 else ""))
    return examples


def load_hf(path_or_name: str | Path, split: str = "train", prompt_key: str = "prompt",
            answer_key: str = "answer") -> list[Example]:
    """Examples through `datasets.load_dataset` on local files: a data file (json/jsonl/parquet/csv) or a
    directory `datasets` understands. Errors name the source and the 1-based row."""
    import datasets

    src = Path(path_or_name)
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(src.suffix.lower())
    try:
        if builder and src.is_file():
            ds = datasets.load_dataset(builder, data_files=str(src), split=split)
        else:
            ds = datasets.load_dataset(str(src), split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one readable line
        raise DataError(f"{src}: cannot load with datasets: {' '.join(f'{type(e).__name__}: {e}'.split())}"[:400]
                        ) from None
    for key in (prompt_key, answer_key):
        if key not in ds.column_names:
            raise DataError(f"{src}: column {key!r} missing (columns: {', '.join(ds.column_names)})")
    examples = [to_example(rec, prompt_key, answer_key, _where(src, f"row {n}")) for n, rec in enumerate(ds, 1)]
    if not examples:
        raise DataError(f"{src}: no records in split {split!r}")
    return examples


def write_jsonl(path: str | Path, rows: Iterable[Example | dict]) -> Path:
    """Write Examples (flat: meta fields, then prompt, answer, traces; `load_examples` reads them back) or
    plain dicts, one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            if isinstance(row, Example):
                row = {**row.meta, "prompt": row.prompt, "answer": row.answer, "traces": row.traces}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
