"""Reading the TOML or JSON files of the ``static`` backends: every problem a
:class:`~shanoir_dicomweb_proxy.ConfigError` that names the file and where in it."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .._store import StoreError, check_keys

__all__ = [
    "file_errors",
    "file_items",
    "read_document",
    "read_json_object",
    "read_text",
    "read_toml",
]


def read_document(path: Path) -> Any:
    """A TOML file (by its ``.toml`` suffix) or a JSON one, parsed; every problem is a
    :class:`ConfigError` naming the file."""
    with file_errors(path):
        if path.suffix.lower() == ".toml":
            return read_toml(path)
        return read_json_object(read_text(path))


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


def read_toml(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise StoreError(f"invalid TOML: {exc}") from None


def read_json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None


@contextmanager
def file_errors(path: Path) -> Iterator[None]:
    """Reading ``path``: its errors (and :class:`StoreError` from checks) as ConfigError."""
    try:
        yield
    except StoreError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def file_items(
    data: Any, key: str, keys: frozenset[str], what: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of the array ``data[key]``, the one key of a file, each with where it is
    (``item 2``) and its keys checked: ``what`` describes one in errors (StoreError)."""
    article = "an" if key[0] in "aeiou" else "a"
    if not isinstance(data, dict):
        raise StoreError(f"expected an object with {article} '{key}' array")
    check_keys("top level", data, frozenset({key}))
    items = data.get(key)
    if not isinstance(items, list):
        raise StoreError(f"{key}: expected an array of {key}")
    for index, item in enumerate(items, 1):
        where = f"item {index}"
        if not isinstance(item, dict):
            raise StoreError(f"{where}: expected {what}")
        check_keys(where, item, keys)
        yield where, item
