"""``store import``: read a JSON or CSV export into rows for the store."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ._sqlite import (
    ImportRow,
    StoreError,
    _check_row,
)

_CSV_COLUMNS = ("exam_id", "study_uid", "acquisition_id", "series_uid")
_FLAT_KEYS = frozenset(_CSV_COLUMNS)
_NESTED_KEYS = frozenset({"exam_id", "study_uid", "public_study_uid", "acquisitions"})
_ACQUISITION_KEYS = frozenset({"acquisition_id", "series_uid", "public_series_uid"})
_DIGITS = re.compile(r"[0-9]+")
_SPACE = re.compile(r"\s*")


def load_import_file(path: str | Path) -> list[ImportRow]:
    """Read an export to import: a JSON array or a CSV file (chosen by the first character).

    JSON: objects ``{"exam_id", "study_uid", "acquisition_id", "series_uid"}`` (the last two
    null or absent for an examination alone), or the nested objects ``store list --json``
    writes. CSV: a header naming the columns ``exam_id,study_uid,acquisition_id,series_uid``
    (any order), one row per acquisition, the acquisition columns empty for an examination
    alone. Rows are named by line in errors.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    start = _SPACE.match(text)
    assert start is not None
    try:
        if text[start.end() : start.end() + 1] in ("[", "{"):
            return list(_json_rows(text))
        return list(_csv_rows(text))
    except StoreError as exc:
        raise StoreError(f"{path}: {exc}") from None


def _json_rows(text: str) -> Iterator[ImportRow]:
    for index, line, item in _json_array(text):
        where = f"item {index} (line {line})"
        if not isinstance(item, dict):
            raise StoreError(f"{where}: expected an object")
        exam_id, study_uid = item.get("exam_id"), item.get("study_uid")
        if "acquisitions" not in item:
            _check_keys(where, item, _FLAT_KEYS)
            acquisition_id, series_uid = item.get("acquisition_id"), item.get("series_uid")
            yield _row(where, exam_id, study_uid, acquisition_id, series_uid)
            continue
        _check_keys(where, item, _NESTED_KEYS)
        yield _row(where, exam_id, study_uid)
        acquisitions = item["acquisitions"]
        if not isinstance(acquisitions, list):
            raise StoreError(f"{where}: acquisitions: expected an array")
        for number, acquisition in enumerate(acquisitions, 1):
            inner = f"{where}, acquisition {number}"
            if not isinstance(acquisition, dict):
                raise StoreError(f"{inner}: expected an object")
            _check_keys(inner, acquisition, _ACQUISITION_KEYS)
            series = acquisition.get("acquisition_id"), acquisition.get("series_uid")
            yield _row(inner, exam_id, study_uid, *series)


def _row(
    where: str, exam_id: Any, study_uid: Any, acquisition_id: Any = None, series_uid: Any = None
) -> ImportRow:
    row = ImportRow(exam_id, study_uid, acquisition_id, series_uid, where=where)
    _check_row(row, where)
    return row


def _json_array(text: str) -> Iterator[tuple[int, int, object]]:
    """The items of a JSON array with their 1-based index and the line each starts on."""
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        match = _SPACE.match(text, pos)
        assert match is not None
        return match.end()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = skip(0)
    if text[pos : pos + 1] != "[":
        raise StoreError(f"line {line_of(pos)}: expected a JSON array of objects")
    pos = skip(pos + 1)
    index, line, counted = 0, 1, 0
    while text[pos : pos + 1] != "]":
        index += 1
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise StoreError(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        yield index, line, item
        pos = skip(pos)
        if text[pos : pos + 1] == ",":
            pos = skip(pos + 1)
        elif text[pos : pos + 1] != "]":
            raise StoreError(f"line {line_of(pos)}: expected ',' or ']' after item {index}")
    if skip(pos + 1) != len(text):
        raise StoreError(f"line {line_of(skip(pos + 1))}: unexpected text after the array")


def _check_keys(where: str, item: Mapping[str, object], allowed: frozenset[str]) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise StoreError(
            f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})"
        )


def _csv_rows(text: str) -> Iterator[ImportRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [name.strip() for name in header]
        missing = [c for c in _CSV_COLUMNS if c not in names]
        unknown = [n for n in names if n not in _CSV_COLUMNS]
        if missing or unknown or len(set(names)) != len(names):
            raise StoreError(
                f"line 1: expected the header {','.join(_CSV_COLUMNS)} (any order), "
                f"got {','.join(names)}"
            )
        for fields in reader:
            where = f"line {reader.line_num}"
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) != len(names):
                raise StoreError(f"{where}: expected {len(names)} fields, got {len(fields)}")
            values = dict(zip(names, (f.strip() for f in fields), strict=True))
            acquisition_id = values["acquisition_id"]
            yield _row(
                where,
                _csv_id(where, "exam_id", values["exam_id"]),
                values["study_uid"],
                _csv_id(where, "acquisition_id", acquisition_id) if acquisition_id else None,
                values["series_uid"] or None,
            )
    except csv.Error as exc:
        raise StoreError(f"line {reader.line_num}: {exc}") from None


def _csv_id(where: str, name: str, value: str) -> int:
    if not _DIGITS.fullmatch(value):
        raise StoreError(f"{where}: {name}: expected a positive integer, got {value!r}")
    return int(value)
