"""``store import``: read a JSON or CSV export into rows for the store."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._sqlite import (
    ImportGrant,
    ImportRow,
    StoreError,
    check_grant,
    check_row,
)

_CSV_COLUMNS = ("exam_id", "study_uid", "acquisition_id", "series_uid")
_FLAT_KEYS = frozenset(_CSV_COLUMNS)
_NESTED_KEYS = frozenset({"exam_id", "study_uid", "public_study_uid", "acquisitions", "grants"})
_ACQUISITION_KEYS = frozenset({"acquisition_id", "series_uid", "public_series_uid"})
_GRANT_KEYS = frozenset({"user", "action"})
_DIGITS = re.compile(r"[0-9]+")
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)
class ImportFile:
    """What an export holds: the bindings, and the grants (nested JSON only)."""

    rows: list[ImportRow]
    grants: list[ImportGrant]


def load_import_file(path: str | Path) -> list[ImportRow]:
    """The bindings of an export (see :func:`load_import`); its grants are left out."""
    return load_import(path).rows


def load_import(path: str | Path) -> ImportFile:
    """Read an export to import: a JSON array or a CSV file (chosen by the first character).

    JSON: objects ``{"exam_id", "study_uid", "acquisition_id", "series_uid"}`` (the last two
    null or absent for an examination alone), or the nested objects ``store list --json``
    writes, with their ``grants`` (``[{"user", "action"}]``). CSV: a header naming the columns
    ``exam_id,study_uid,acquisition_id,series_uid`` (any order), one row per acquisition, the
    acquisition columns empty for an examination alone. Rows are named by line in errors.
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
            found = list(_json_rows(text))
            rows = [row for row in found if isinstance(row, ImportRow)]
            grants = [row for row in found if isinstance(row, ImportGrant)]
            return ImportFile(rows, grants)
        return ImportFile(list(_csv_rows(text)), [])
    except StoreError as exc:
        raise StoreError(f"{path}: {exc}") from None


def _json_rows(text: str) -> Iterator[ImportRow | ImportGrant]:
    for index, line, item in _json_array(text):
        where = f"item {index} (line {line})"
        if not isinstance(item, dict):
            raise StoreError(f"{where}: expected an object")
        exam_id: Any = item.get("exam_id")
        study_uid: Any = item.get("study_uid")
        if "acquisitions" not in item and "grants" not in item:
            check_keys(where, item, _FLAT_KEYS)
            acquisition_id, series_uid = item.get("acquisition_id"), item.get("series_uid")
            yield _row(where, exam_id, study_uid, acquisition_id, series_uid)
            continue
        check_keys(where, item, _NESTED_KEYS)
        yield _row(where, exam_id, study_uid)
        for number, acquisition in enumerate(_objects(item, "acquisitions", where), 1):
            inner = f"{where}, acquisition {number}"
            check_keys(inner, acquisition, _ACQUISITION_KEYS)
            series = acquisition.get("acquisition_id"), acquisition.get("series_uid")
            yield _row(inner, exam_id, study_uid, *series)
        for number, grant in enumerate(_objects(item, "grants", where), 1):
            inner = f"{where}, grant {number}"
            check_keys(inner, grant, _GRANT_KEYS)
            user: Any = grant.get("user")
            action: Any = grant.get("action")
            check_grant(user, exam_id, action, inner)
            yield ImportGrant(user, exam_id, action, where=inner)


def _objects(item: Mapping[str, Any], key: str, where: str) -> Iterator[Mapping[str, Any]]:
    """The objects of the array ``item[key]`` (absent: none)."""
    values = item.get(key, [])
    if not isinstance(values, list):
        raise StoreError(f"{where}: {key}: expected an array")
    for number, value in enumerate(values, 1):
        if not isinstance(value, dict):
            raise StoreError(f"{where}, {key[:-1]} {number}: expected an object")
        yield value


def _row(
    where: str, exam_id: Any, study_uid: Any, acquisition_id: Any = None, series_uid: Any = None
) -> ImportRow:
    row = ImportRow(exam_id, study_uid, acquisition_id, series_uid, where=where)
    check_row(row, where)
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


def check_keys(where: str, item: Mapping[str, object], allowed: frozenset[str]) -> None:
    """Only ``allowed`` keys in ``item``, else :class:`StoreError` naming the first other."""
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
