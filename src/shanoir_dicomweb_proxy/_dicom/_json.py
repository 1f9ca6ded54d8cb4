"""The DICOM JSON model (PS3.18 Annex F), and identifier translation in its bodies, as streams.

A JSON array (search results, metadata) is cut into its top-level objects as the bytes arrive
and each batch of complete objects is parsed with orjson, translated with one lookup, and
written out again: memory holds one chunk and one object, whatever the size of the study.
Objects are found without a character loop in Python: orjson parses from the start of an
object and reports where the document ends ("unexpected content after document"), and a
second parse of exactly that slice confirms it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from .._errors import UpstreamError
from ._tags import json_key
from ._uids import (
    DatasetView,
    Resolve,
    Translation,
    UidCollector,
    apply_translation,
    collect_uids,
    copies_of,
)

__all__ = ["JsonDataset", "JsonRewriter", "json_value"]

_WHITESPACE = b" \t\r\n"
_NO_TRANSLATION = Translation(studies={}, series={})

#: Closing braces tried from the end of the buffer for the end of the last complete object:
#: an object cut in its middle holds about one per element before the cut.
_BRACES_TRIED = 512

#: JSON keys of the tags looked up in every dataset, and tag numbers of the keys met: formatting
#: and parsing them per element was a tenth of the translation of a metadata answer.
_KEYS: dict[int, str] = {}
_TAGS: dict[str, int] = {}


def _tag(key: str) -> int:
    tag = _TAGS.get(key)
    if tag is None:
        tag = int(key, 16)
        if len(_TAGS) < 4096:  # the UI-valued tags met: a few dozen in practice
            _TAGS[key] = tag
            _KEYS[tag] = key
    return tag


class JsonDataset:
    """A DICOM JSON object (PS3.18 Annex F) as a :class:`DatasetView`."""

    __slots__ = ("data", "_sequences", "_bulk", "_uid_tags")

    def __init__(self, data: dict[str, Any], *, sequences: bool = True, bulk: bool = True) -> None:
        """``sequences`` and ``bulk`` may say, from a look at the raw bytes, that the object
        holds no sequence or no BulkDataURI: its elements are then not looked through."""
        self.data = data
        self._sequences: list[tuple[int, list[JsonDataset]]] = []
        self._bulk: list[dict[str, Any]] = []
        self._uid_tags: list[int] = []
        # One pass over the elements finds all three (three passes cost a third of the
        # translation of a metadata answer).
        for key, element in data.items():
            if type(element) is not dict:
                continue
            vr = element.get("vr")
            if vr == "UI":
                self._uid_tags.append(_tag(key))
            elif vr == "SQ" and sequences and element.get("Value"):
                items = [JsonDataset(i, bulk=bulk) for i in element["Value"] if type(i) is dict]
                self._sequences.append((int(key, 16), items))
            if bulk and "BulkDataURI" in element:
                self._bulk.append(element)

    def get(self, tag: int) -> list[str] | None:
        element = self.data.get(_KEYS.get(tag) or json_key(tag))
        if type(element) is not dict:
            return None
        values = element.get("Value")
        if not isinstance(values, list):
            return []
        return [v for v in values if type(v) is str]

    def put(self, tag: int, values: list[str] | None) -> None:
        element = self.data[_KEYS.get(tag) or json_key(tag)]
        if values is None:
            element.pop("Value", None)
        elif element.get("vr") == "PN":  # PS3.18 F.2.2: a person name is an object
            element["Value"] = [{"Alphabetic": value} for value in values]
        else:
            element["Value"] = values

    def sequences(self) -> Iterable[tuple[int, Iterable[DatasetView]]]:
        return self._sequences

    def uid_tags(self) -> Iterable[int]:
        return self._uid_tags

    def map_links(self, rewrite: Callable[[str], str | None]) -> None:
        for element in self._bulk:
            uri = element["BulkDataURI"]
            new = rewrite(uri) if type(uri) is str else None
            if new is None:
                del element["BulkDataURI"]
            else:
                element["BulkDataURI"] = new


class JsonRewriter:
    """Translate a DICOM JSON body: an array of datasets as a stream, or one object whole.

    Top-level datasets of unknown studies (or hidden series) are left out of the array.
    ``study_known`` says whether the route's own study is known (rows without (0020,000D)
    then belong to it). An object larger than ``max_object`` bytes is an error. ``rows``, when
    given, counts the objects of the array in its first item.
    """

    def __init__(
        self,
        resolve: Resolve,
        *,
        study_known: bool,
        max_object: int = 256 * 1024 * 1024,
        rows: list[int] | None = None,
    ) -> None:
        self._resolve = resolve
        self._rows = rows  # rows[0] counts the array's objects, kept or dropped
        self._study_known = study_known
        self._max = max_object
        self._buffer = bytearray()
        self._pos = 0  # where the next object (or separator) starts in the buffer
        self._retry_at = 0  # the buffer size at which an incomplete object is worth a new try
        self._array: bool | None = None  # None until the first byte tells
        self._first = True
        self._done = False
        self._hint = 0  # the size of the last object

    async def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        if self._array is None:
            start = _skip_space(self._buffer, 0)
            if start == len(self._buffer):
                return b""
            self._array = self._buffer[start] == ord("[")
            self._pos = start + 1 if self._array else start
            if self._array:
                head = b"["
                return head + await self._objects()
        if not self._array:
            if len(self._buffer) > self._max:
                raise UpstreamError(f"a DICOM JSON object exceeds {self._max} bytes")
            return b""
        return await self._objects()

    async def close(self) -> bytes:
        if self._array is None:
            return b""
        if not self._array:
            try:
                value = orjson.loads(self._buffer)
            except orjson.JSONDecodeError as exc:
                raise UpstreamError("the upstream sent malformed DICOM JSON") from exc
            self._buffer = bytearray()
            if type(value) is dict:
                view = JsonDataset(value)
                translation = await self._translate([view])
                apply_translation(view, translation, study_known=self._study_known)
            return orjson.dumps(value)
        out = await self._objects(final=True)
        if not self._done or _skip_space(self._buffer, self._pos) != len(self._buffer):
            raise UpstreamError("the upstream's DICOM JSON answer ended early")
        return out

    async def _objects(self, *, final: bool = False) -> bytes:
        """Translate every complete object in the buffer; keep the incomplete rest."""
        if self._done or (len(self._buffer) < self._retry_at and not final):
            return b""
        objects: list[JsonDataset] = []
        buffer = self._buffer
        pos = self._batch(objects)
        view = memoryview(buffer)
        try:
            while True:
                pos = _skip_space(buffer, pos)
                if pos == len(buffer):
                    break
                byte = buffer[pos]
                if byte == ord(","):
                    pos += 1
                    continue
                if byte == ord("]"):
                    self._done = True
                    pos += 1
                    break
                found = _next_value(view, pos, self._hint)
                if found is None:
                    break
                value, end = found
                if type(value) is not dict:
                    raise UpstreamError("the upstream's DICOM JSON array holds a non-object")
                has_sequences = buffer.find(b'"SQ"', pos, end) >= 0
                has_bulk = buffer.find(b'"BulkDataURI"', pos, end) >= 0
                objects.append(JsonDataset(value, sequences=has_sequences, bulk=has_bulk))
                self._hint = end - pos
                pos = end
        finally:
            view.release()
        del buffer[:pos]
        self._pos = 0
        rest = len(buffer)
        if rest > self._max:
            raise UpstreamError(f"a DICOM JSON object exceeds {self._max} bytes")
        # An incomplete object is tried again once the buffer has doubled: linear, not
        # quadratic, in the size of a large object arriving in small chunks.
        self._retry_at = 2 * rest if rest > 65536 else 0
        out = await self._translate_rows(objects)
        return out + (b"]" if self._done else b"")

    def _batch(self, objects: list[JsonDataset]) -> int:
        """Every complete object from ``_pos`` on, parsed in one go, into ``objects``;
        where the object-by-object search goes on.

        The end of the last complete object is guessed from the braces (a brace inside a
        string can only make the guess wrong, and the parse tells): then one parse of that
        slice as an array, instead of two parses (and an error) per object.
        """
        buffer = self._buffer
        pos = _skip_space(buffer, self._pos)
        if pos < len(buffer) and buffer[pos] == ord(","):
            pos = _skip_space(buffer, pos + 1)
        end = _complete_end(buffer, pos)
        if end is None:
            return pos
        array = bytearray(b"[")
        array += memoryview(buffer)[pos:end]
        array += b"]"
        try:
            values = orjson.loads(array)
        except orjson.JSONDecodeError:
            return pos  # a guess off the mark: object by object
        if any(type(value) is not dict for value in values):
            raise UpstreamError("the upstream's DICOM JSON array holds a non-object")
        has_sequences = buffer.find(b'"SQ"', pos, end) >= 0
        has_bulk = buffer.find(b'"BulkDataURI"', pos, end) >= 0
        objects += [JsonDataset(v, sequences=has_sequences, bulk=has_bulk) for v in values]
        if values:
            self._hint = (end - pos) // len(values)
        return end

    async def _translate(self, views: list[JsonDataset]) -> Translation:
        collector = UidCollector()
        for view in views:
            collect_uids(view, collector)
        if not collector:
            return _NO_TRANSLATION
        return await self._resolve(collector)

    async def _translate_rows(self, views: list[JsonDataset]) -> bytes:
        if not views:
            return b""
        if self._rows is not None:
            self._rows[0] += len(views)
        translation = await self._translate(views)
        out: list[bytes] = []
        for view in views:
            copies = copies_of(view, translation)
            pristine = orjson.dumps(view.data) if copies else b""
            if apply_translation(view, translation, study_known=self._study_known):
                out.append(orjson.dumps(view.data))
            for copy in copies:
                clone = JsonDataset(orjson.loads(pristine))
                if apply_translation(clone, copy, study_known=self._study_known):
                    out.append(orjson.dumps(clone.data))
        if not out:
            return b""
        body = b",".join(out)
        if self._first:
            self._first = False
            return body
        return b"," + body


def _complete_end(buffer: bytearray, pos: int) -> int | None:
    """Where the complete values of a comma-separated run of objects from ``pos`` seem to end
    (after the last ``}`` that closes a top-level object, by counting braces), or None."""
    opened = buffer.count(b"{", pos)
    closed = buffer.count(b"}", pos)
    end = len(buffer)
    for _ in range(_BRACES_TRIED):
        if not opened >= closed > 0:
            return None
        brace = buffer.rfind(b"}", pos, end)
        if brace < 0:
            return None
        opened -= buffer.count(b"{", brace, end)
        closed -= buffer.count(b"}", brace + 1, end)
        if opened == closed:
            return brace + 1
        closed -= 1
        end = brace
    return None


def _skip_space(buffer: bytearray, pos: int) -> int:
    size = len(buffer)
    while pos < size and buffer[pos] in _WHITESPACE:
        pos += 1
    return pos


def _next_value(view: memoryview, start: int, hint: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``start`` and where it ends; None when it is not complete.

    orjson parses a window of the buffer and, when the value ends inside it, reports where
    ("unexpected content after document"): that slice, parsed again, is the value. Windows
    start at twice the previous value's size and double, so that a value costs about two
    parses of itself whatever the size of the buffer behind it.
    """
    size = len(view)
    window = max(2 * hint, 16384)
    while True:
        stop = min(start + window, size)
        try:
            return orjson.loads(view[start:stop]), stop
        except orjson.JSONDecodeError as exc:
            # The position counts characters: bytes differ once the text is not ASCII.
            doc = exc.doc
            ascii_only = len(doc) == stop - start
            end = start + (exc.pos if ascii_only else len(doc[: exc.pos].encode()))
        while end > start and view[end - 1] in _WHITESPACE:
            end -= 1
        if start < end < stop:
            try:
                return orjson.loads(view[start:end]), end
            except orjson.JSONDecodeError:
                pass  # the window cut the value: a larger one
        if stop == size:
            return None  # cut in the middle, or malformed (close() tells which)
        window *= 2


def json_value(row: Mapping[str, Any], tag: int) -> object:
    """The first value of ``tag`` in a DICOM JSON object, or None."""
    element = row.get(json_key(tag))
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None
