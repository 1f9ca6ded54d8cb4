"""Streaming rewrite of the study and series UIDs inside one DICOM Part 10 file.

One instance of a ``multipart/related; type="application/dicom"`` retrieve answer is parsed
as it arrives; the rules of :mod:`._uids` are applied to a :class:`DatasetView` of its
elements, and the file is written out again byte for byte except for the changed values and
the lengths that enclose them.

Buffering rule. The preamble, the File Meta group and the top-level elements up to (0020,000E)
are held, whatever their sizes (at most ``max_buffer``), then translated in one batch: this
first flush decides whether the instance is shown at all (an unknown study or series drops it
whole, and nothing of it is ever sent). It is made as soon as (0020,000E) is passed, over the
elements after it already received too (up to a large value; not part of a sequence, nor a
malformed element): a header that arrives whole is translated with one lookup. After it, small
top-level elements are held and flushed in batches; a large top-level value (``large_value``
bytes or more, or of undefined length, and not a sequence: pixel data) flushes the batch before
it and then streams through as it arrives. Sequences are always held whole, since a UID inside
one changes its lengths.

Deflated transfer syntaxes (PS3.5 §A.5: the whole dataset after the File Meta group is one raw
deflate stream) are inflated as they arrive, in pieces of at most ``_INFLATE_PIECE`` bytes that
go through the same parser, and what comes out is deflated again piece by piece: memory holds
what the parser holds plus zlib's windows, whatever the compression ratio.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

from pydicom.datadict import dictionary_VR

from .._errors import MalformedBody
from ._multipart import Chunk
from ._tags import SERIES_INSTANCE_UID, SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID
from ._uids import (
    TRANSLATED_TAGS,
    DatasetView,
    Resolve,
    Translation,
    UidCollector,
    apply_translation,
    collect_uids,
)

__all__ = ["Part10Rewriter"]

_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
# SOP Class and SOP Instance UIDs, readable by an ``admit`` hook.
_ADMIT_TAGS: Final = frozenset({SOP_CLASS_UID, SOP_INSTANCE_UID})

_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
# Whole-dataset deflate: Deflated Explicit VR LE and JPIP Referenced Deflate.
_DEFLATED: Final = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
# Inflated bytes handed to the parser at a time, so that a high ratio cannot fill memory.
_INFLATE_PIECE: Final = 64 * 1024

# Explicit VRs whose length field is 4 bytes (after 2 reserved bytes); the others have 2.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS: Final = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
# String VRs padded with a space; UI (and binary VRs) are padded with a NUL.
_SPACE_PADDED: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR"}
    | {"UT"}
)

# Parser actions (what _scan stopped for).
_MORE: Final = 0  # needs more input
_FIRST: Final = 1  # reached the first top-level element after (0020,000E), for ``admit``
_BATCH: Final = 2  # the held batch is big enough to go
_LARGE: Final = 3  # reached a large top-level value, to stream

# Frame kinds of the parser's stack.
_SEQ: Final = 0
_ITEM_FRAME: Final = 1
_FRAGMENTS: Final = 2  # an undefined-length value other than a sequence (encapsulated data)

_PREAMBLE: Final = 0
_META: Final = 1
_DATASET: Final = 2

_VR_CACHE: dict[int, str] = {}


def _implicit_vr(tag: int) -> str:
    """The dictionary VR of ``tag``, or "" for a private or unknown one (cached)."""
    vr = _VR_CACHE.get(tag)
    if vr is None:
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = ""
        if len(_VR_CACHE) < 65536:
            _VR_CACHE[tag] = vr
    return vr


class _Encoding:
    """Byte order and VR form of a dataset, with its precompiled header formats."""

    __slots__ = ("explicit", "little", "explicit_header", "item_header", "u16", "u32")

    def __init__(self, *, explicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.explicit = explicit
        self.little = little
        self.explicit_header = struct.Struct(order + "HH2sH")  # group, element, VR, length
        self.item_header = struct.Struct(order + "HHL")  # also an implicit element's header
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "L")


_EXPLICIT_LITTLE: Final = _Encoding(explicit=True, little=True)
_EXPLICIT_BIG: Final = _Encoding(explicit=True, little=False)
_IMPLICIT_LITTLE: Final = _Encoding(explicit=False, little=True)


class _Element:
    """A held element whose value may be translated (of TRANSLATED_TAGS, or UI-valued)."""

    __slots__ = ("tag", "vr", "start", "header", "long", "value", "new", "encoding", "_values")

    def __init__(
        self, tag: int, vr: str, start: int, header: bytes, value: bytes, encoding: _Encoding
    ) -> None:
        self.tag = tag
        self.vr = vr
        self.start = start  # stream position (see Part10Rewriter._off)
        self.header = header
        self.long = len(header) == 12 or not encoding.explicit  # 4-byte length field
        self.value = value
        self.new: bytes | None = None
        self.encoding = encoding
        self._values: list[str] | None = None

    def values(self) -> list[str]:
        """The values (decoded once; not to be changed by the caller)."""
        if self._values is None:
            raw = self.value if self.new is None else self.new
            text = raw.decode("utf-8", "surrogateescape").rstrip("\0 ")
            self._values = text.split("\\") if text else []
        return self._values

    def encode(self, values: list[str] | None) -> None:
        if (values or []) == self.values():
            return
        raw = "\\".join(values or []).encode("utf-8", "surrogateescape")
        if len(raw) % 2:
            raw += b" " if self.vr in _SPACE_PADDED else b"\0"
        if not self.long and len(raw) > 0xFFFF:
            raise MalformedBody("a DICOM value too long for its length field once rewritten")
        self.new = None if raw == self.value else raw
        self._values = None

    def replacement(self) -> bytes:
        """Header and new value, to replace the original element."""
        assert self.new is not None
        if self.long:
            length = self.encoding.u32.pack(len(self.new))
            return self.header[: len(self.header) - 4] + length + self.new
        return self.header[:6] + self.encoding.u16.pack(len(self.new)) + self.new


class _Sequence:
    __slots__ = ("tag", "items", "length_at", "length", "encoding")

    def __init__(self, tag: int, length_at: int, length: int, encoding: _Encoding) -> None:
        self.tag = tag
        self.items: list[_Dataset] = []
        self.length_at = length_at  # stream position of the 4-byte length field
        self.length = length  # _UNDEFINED, or the original defined length
        self.encoding = encoding  # of the element header holding the length field


class _Dataset:
    """The Part 10 :class:`DatasetView`: a sequence item, or the held top-level elements.

    Only what the rules may look at is kept: the elements of TRANSLATED_TAGS and the UI-valued
    ones (short), the sequences, and the group lengths (which follow the changes of their group).
    """

    __slots__ = (
        "elements",
        "seqs",
        "group_lengths",
        "length_at",
        "length",
        "encoding",
        "_first",
        "_indexed",
    )

    def __init__(self, length_at: int, length: int, encoding: _Encoding) -> None:
        self.elements: list[_Element] = []
        self.seqs: list[_Sequence] = []
        self.group_lengths: list[tuple[int, int, int]] | None = None  # group, at, value
        self.length_at = length_at  # item length field; -1 for the top level
        self.length = length
        self.encoding = encoding
        self._first: dict[int, _Element] = {}  # the first element of each tag, once parsed
        self._indexed = 0  # how many of ``elements`` _first was built from

    def counts(self) -> tuple[int, int, int]:
        """How many elements, sequences and group lengths it holds (see :meth:`cut`)."""
        return len(self.elements), len(self.seqs), len(self.group_lengths or ())

    def cut(self, counts: tuple[int, int, int]) -> None:
        """Forget what was parsed since :meth:`counts` gave ``counts``."""
        elements, seqs, group_lengths = counts
        del self.elements[elements:], self.seqs[seqs:]
        if self.group_lengths is not None:
            del self.group_lengths[group_lengths:]

    def get(self, tag: int) -> list[str] | None:
        if self._indexed != len(self.elements):
            self._first = {element.tag: element for element in reversed(self.elements)}
            self._indexed = len(self.elements)
        element = self._first.get(tag)
        return None if element is None else element.values()

    def put(self, tag: int, values: list[str] | None) -> None:
        for element in self.elements:  # every copy of a repeated tag, so that none leaks
            if element.tag == tag:
                element.encode(values)

    def sequences(self) -> Iterable[tuple[int, Iterable[_Dataset]]]:
        return [(seq.tag, seq.items) for seq in self.seqs]

    def uid_tags(self) -> Iterable[int]:
        return [element.tag for element in self.elements if element.vr == "UI"]

    def map_links(self, rewrite: Callable[[str], str | None]) -> None:
        """Part 10 has no links other than RetrieveURL, which :meth:`get` and :meth:`put` see."""

    def patches(self, into: list[tuple[int, int, bytes]]) -> int:
        """Add the (start, end, bytes) replacements this dataset needs; return its size change."""
        delta = 0
        groups: dict[int, int] | None = {} if self.group_lengths else None
        for element in self.elements:
            if element.new is not None:
                end = element.start + len(element.header) + len(element.value)
                into.append((element.start, end, element.replacement()))
                change = len(element.new) - len(element.value)
                delta += change
                if groups is not None:
                    groups[element.tag >> 16] = groups.get(element.tag >> 16, 0) + change
        for seq in self.seqs:
            change = 0
            for item in seq.items:
                item_change = item.patches(into)
                if item_change and item.length != _UNDEFINED:
                    packed = item.encoding.u32.pack(item.length + item_change)
                    into.append((item.length_at, item.length_at + 4, packed))
                change += item_change
            if change and seq.length != _UNDEFINED:
                packed = seq.encoding.u32.pack(seq.length + change)
                into.append((seq.length_at, seq.length_at + 4, packed))
            delta += change
            if groups is not None and change:
                groups[seq.tag >> 16] = groups.get(seq.tag >> 16, 0) + change
        if groups and self.group_lengths:
            for group, at, value in self.group_lengths:
                if groups.get(group):
                    packed = self.encoding.u32.pack((value + groups[group]) & 0xFFFFFFFF)
                    into.append((at, at + 4, packed))
        return delta


class _Frame:
    """An open sequence, item or fragment list of the parser's stack."""

    __slots__ = ("kind", "end", "encoding", "node")

    def __init__(
        self, kind: int, end: int, encoding: _Encoding, node: _Dataset | _Sequence | None
    ) -> None:
        self.kind = kind
        self.end = end  # stream position of its end, or -1 when delimited
        self.encoding = encoding  # of what it contains
        self.node = node


_Chunk = bytes | bytearray | memoryview


def _join(out: list[_Chunk]) -> Chunk:
    if len(out) == 1 and not isinstance(out[0], bytearray):
        return out[0]  # a slice of the input, passed on without a copy
    return b"".join(out)


def _malformed(what: str) -> MalformedBody:
    return MalformedBody(f"a malformed DICOM file ({what})")


class Part10Rewriter:
    """Rewrite the study and series UIDs of one Part 10 file, streaming its large values.

    ``resolve`` looks up the real UIDs met (one call per flushed batch that holds any);
    ``study_known`` says whether the request's own study is known. Feed the file's bytes in any
    chunks, then :meth:`close`. When the instance must not be shown, ``dropped`` becomes True
    and nothing of it is ever returned.

    ``admit``, when given, sees the top-level elements up to (0020,000E) before anything is
    translated or returned (with (0008,0016) and (0008,0018) readable too); False drops the
    instance (the rest of its bytes are then ignored).
    """

    keeps_length = False  # as a multipart part: UIDs change size, so does the file
    siblings: Sequence[bytes] = ()

    def __init__(
        self,
        resolve: Resolve,
        *,
        study_known: bool,
        max_buffer: int = 64 * 1024 * 1024,
        large_value: int = 64 * 1024,
        admit: Callable[[DatasetView], Awaitable[bool]] | None = None,
    ) -> None:
        self._resolve = resolve
        self._admit = admit
        self._tags = TRANSLATED_TAGS if admit is None else TRANSLATED_TAGS | _ADMIT_TAGS
        self._study_known = study_known
        self._max = max_buffer
        self._large = max(1, large_value)
        self.dropped = False
        self._translation: Translation | None = None
        self._phase = _PREAMBLE
        self._meta_end = -1
        self._encoding = _EXPLICIT_LITTLE
        self._syntax_seen = False
        self._syntax = ""
        # Held input: _buf[0] is at stream position _off; positions below are stream positions.
        self._buf: _Chunk = b""
        self._off = 0
        self._pos = 0  # parsed up to here
        self._base = 0  # output up to here
        self._need = 0  # do not parse again before the input reaches this
        self._stack: list[_Frame] = []
        self._first_done = False
        self._past_series = False  # a top-level element after (0020,000E) was met
        # Where that element is, and the first batch's counts there, until the first flush.
        self._first_at = -1
        self._first_held = (0, 0, 0)
        self._batch = _Dataset(-1, _UNDEFINED, _EXPLICIT_LITTLE)
        self._value_at = 0  # where the value of a large element found by _scan starts
        self._value_length = 0
        # Streaming a large value: bytes of it still to pass, or a fragment list to follow.
        self._left = 0
        self._fragments = False
        self._item_header = bytearray()
        # A deflated dataset: its inflater and deflater, the compressed input met with the end of
        # the File Meta group, the output bytes still to pass as they are (preamble and File
        # Meta) and the size of the deflated output so far.
        self._inflater: zlib._Decompress | None = None
        self._deflater: zlib._Compress | None = None
        self._tail: _Chunk = b""
        self._plain_out = 0
        self._deflated_out = 0

    @property
    def buffered(self) -> int:
        """Bytes of input held (for tests and metrics)."""
        return len(self._buf) + len(self._item_header)

    async def feed(self, chunk: Chunk) -> Chunk:
        """Take the next bytes of the file; return the rewritten bytes ready so far."""
        if self.dropped or not chunk:
            return b""
        if self._inflater is not None:
            return await self._inflate(chunk)
        out: list[_Chunk] = []
        await self._consume(chunk, out)
        if self._inflater is None or self.dropped:
            return b"" if self.dropped else _join(out)
        # The File Meta group just ended, in a deflated transfer syntax: out holds nothing.
        tail, self._tail = self._tail, b""
        return await self._inflate(tail)

    async def close(self) -> Chunk:
        """End of the file: return the rest; raise :class:`MalformedBody` if it was cut short."""
        if self.dropped:
            return b""
        inflated = b""
        if self._inflater is not None:
            inflated = await self._inflate(b"", final=True)
            if self.dropped:
                return b""
        if self._phase == _META and self._meta_end < 0:
            self._scan_meta(at_end=True)
        if (
            self._phase != _DATASET
            or self._left
            or self._fragments
            or self._stack
            or self._pos != self._off + len(self._buf)
        ):
            raise MalformedBody("a truncated DICOM file")
        out: list[_Chunk] = []
        await self._flush(out, first=not self._first_done)
        self._buf = b""
        if self.dropped:
            return b""
        if self._deflater is None:
            return _join(out)
        rest = self._deflate(out)
        end = self._deflater.flush()
        self._deflated_out += len(end)
        rest += end
        if self._deflated_out % 2:  # PS3.5 §A.5: padded to an even length
            rest += b"\0"
        return inflated + rest

    # -- deflated datasets -------------------------------------------------------------

    async def _inflate(self, data: _Chunk, *, final: bool = False) -> bytes:
        """Inflate ``data``, parse and rewrite it, and deflate the output, piece by piece."""
        inflater = self._inflater
        assert inflater is not None
        compressed: list[bytes] = []
        while not self.dropped:
            try:
                piece = inflater.decompress(data, _INFLATE_PIECE)
            except zlib.error as exc:
                raise _malformed("a corrupt deflated dataset") from exc
            data = inflater.unconsumed_tail
            if piece:
                out: list[_Chunk] = []
                await self._consume(piece, out)
                if out and not self.dropped:
                    compressed.append(self._deflate(out))
            if inflater.eof:
                # What follows the stream (NUL padding; image_dfl.dcm of pydicom has a gzip
                # trailer) is left out, as readers ignore it.
                break
            if not data and len(piece) < _INFLATE_PIECE:
                if final:
                    raise MalformedBody("a truncated DICOM file")
                break
        return b"" if self.dropped else b"".join(compressed)

    def _deflate(self, out: list[_Chunk]) -> bytes:
        """The output pieces in their final form: preamble and File Meta as they are, the
        dataset deflated."""
        assert self._deflater is not None
        data = _join(out)
        plain = b""
        if self._plain_out:
            take = min(self._plain_out, len(data))
            plain, data = bytes(data[:take]), data[take:]
            self._plain_out -= take
        deflated = self._deflater.compress(data)
        self._deflated_out += len(deflated)
        return plain + deflated

    # -- input handling -------------------------------------------------------------------

    async def _consume(self, data: _Chunk, out: list[_Chunk]) -> None:
        while data:
            if self._left:
                if len(data) <= self._left:
                    self._left -= len(data)
                    out.append(data)
                    return
                view = memoryview(data)
                out.append(view[: self._left])
                data = view[self._left :]
                self._left = 0
            elif self._fragments:
                data = self._fragment_header(data, out)
            else:
                self._hold(data)
                await self._run(out)
                if self.dropped:
                    return
                data = self._release() if self._left or self._fragments else b""

    def _hold(self, data: _Chunk) -> None:
        if not self._buf:
            self._buf = data
            return
        if not isinstance(self._buf, bytearray):
            self._buf = bytearray(self._buf)
        self._buf += data

    def _release(self) -> memoryview:
        """Start streaming: hand back the held input past the parse position."""
        rest = memoryview(self._buf)[self._pos - self._off :]
        self._buf = b""
        self._off = self._pos = self._base = self._need = 0
        return rest

    def _compact(self) -> None:
        """Drop the input already sent; check the bound on what is held."""
        done = self._base - self._off
        if done:
            if isinstance(self._buf, bytearray):
                del self._buf[:done]
            else:
                self._buf = bytearray(memoryview(self._buf)[done:])
            self._off = self._base
        if len(self._buf) > self._max or self._need - self._off > self._max:
            raise MalformedBody(f"a DICOM header or sequence larger than {self._max} bytes")

    def _fragment_header(self, data: _Chunk, out: list[_Chunk]) -> _Chunk:
        """Pass one item header of an encapsulated value being streamed."""
        held = self._item_header
        data = memoryview(data)
        if held or len(data) < 8:
            take = 8 - len(held)
            held += data[:take]
            data = data[take:]
            if len(held) < 8:
                return data
            header = bytes(held)
            held.clear()
        else:
            header = bytes(data[:8])
            data = data[8:]
        group, element, length = self._encoding.item_header.unpack(header)
        tag = group << 16 | element
        if tag == _ITEM and length != _UNDEFINED:
            self._left = length
        elif tag == _SEQUENCE_END:
            self._fragments = False
        else:
            raise _malformed("bad item in an encapsulated value")
        out.append(header)
        return data

    # -- parsing ----------------------------------------------------------------------------

    async def _run(self, out: list[_Chunk]) -> None:
        if self._phase != _DATASET and not self._scan_meta(at_end=False):
            self._compact()
            return
        while True:
            try:
                action = self._scan()
            except MalformedBody:
                if self._first_at < 0:
                    raise
                # Decided first, as when the rest had not come yet: parsed again if shown.
                self._cut_back()
                action = _FIRST
            if action == _MORE:
                self._compact()
                return
            await self._flush(out, first=not self._first_done)
            if self.dropped:
                self._buf = b""
                return
            if action == _LARGE:
                with memoryview(self._buf) as view:
                    out.append(bytes(view[self._pos - self._off : self._value_at - self._off]))
                self._pos = self._base = self._value_at
                if self._value_length == _UNDEFINED:
                    self._fragments = True
                else:
                    self._left = self._value_length  # >= large_value >= 1
                return

    def _scan_meta(self, *, at_end: bool) -> bool:
        """Parse the preamble and File Meta group; True once the dataset starts."""
        buf = self._buf  # nothing is sent before the first flush: _off is 0 here
        if self._phase == _PREAMBLE:
            if len(buf) < 132:
                return False
            if bytes(buf[128:132]) != b"DICM":
                raise MalformedBody("a DICOM file without the 'DICM' prefix")
            self._phase = _META
            self._pos = 132
        pos = self._pos
        header = _EXPLICIT_LITTLE.explicit_header
        while self._meta_end < 0 or pos < self._meta_end:
            if pos + 8 > len(buf):
                if at_end and pos == len(buf) and self._syntax_seen:
                    break  # a File Meta group without its length, and no dataset
                self._pos = pos
                return False
            group, element, vr, length = header.unpack_from(buf, pos)
            if group != 2:  # also when (0002,0000) overstates the group's length
                break
            start = pos + 8
            if vr in _LONG_VRS:
                if pos + 12 > len(buf):
                    self._pos = pos
                    return False
                (length,) = _EXPLICIT_LITTLE.u32.unpack_from(buf, pos + 8)
                start = pos + 12
            if length == _UNDEFINED:
                raise _malformed("undefined length in the File Meta group")
            end = start + length
            if end > len(buf):
                self._pos, self._need = pos, end
                return False
            if element == 0 and length == 4:
                (size,) = _EXPLICIT_LITTLE.u32.unpack_from(buf, start)
                self._meta_end = end + size
            elif element == 0x10:
                syntax = bytes(buf[start:end]).decode("ascii", "replace").rstrip("\0 ")
                self._set_syntax(syntax)
            pos = end
        self._phase = _DATASET
        self._pos = self._need = pos
        self._batch = _Dataset(-1, _UNDEFINED, self._encoding)
        if self._syntax in _DEFLATED:
            # The rest of the input is compressed: it goes through the inflater (see feed).
            self._tail, self._buf = bytes(buf[pos:]), buf[:pos]
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            self._deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            self._plain_out = pos
        return True

    def _set_syntax(self, syntax: str) -> None:
        self._syntax_seen = True
        self._syntax = syntax
        if syntax in _DEFLATED and self._meta_end < 0:
            # Without it, the end of the File Meta group would be guessed in compressed bytes.
            raise _malformed("a deflated dataset without a File Meta group length")
        if syntax == _IMPLICIT_LE:
            self._encoding = _IMPLICIT_LITTLE
        elif syntax == _EXPLICIT_BE:
            self._encoding = _EXPLICIT_BIG
        else:
            self._encoding = _EXPLICIT_LITTLE

    def _scan(self) -> int:
        """Parse held input as far as it goes, or until a top-level decision is due."""
        buf = self._buf
        off = self._off
        size = off + len(buf)
        if size < self._need:
            return _MORE
        pos = self._pos
        stack = self._stack
        top_encoding = self._encoding
        past_series = self._past_series
        large = self._large
        while True:
            if stack:
                frame = stack[-1]
                if frame.end >= 0 and pos >= frame.end:
                    if pos > frame.end:
                        raise _malformed("an item or sequence overruns its length")
                    stack.pop()
                    continue
                encoding = frame.encoding
                if pos + 8 > size:
                    break
                kind = frame.kind
                if kind != _ITEM_FRAME:
                    group, element, length = encoding.item_header.unpack_from(buf, pos - off)
                    tag = group << 16 | element
                    if tag == _ITEM:
                        if kind == _SEQ:
                            end = -1 if length == _UNDEFINED else pos + 8 + length
                            item = _Dataset(pos + 4, length, encoding)
                            assert isinstance(frame.node, _Sequence)
                            frame.node.items.append(item)
                            stack.append(_Frame(_ITEM_FRAME, end, encoding, item))
                            pos += 8
                        elif length == _UNDEFINED:
                            raise _malformed("undefined-length fragment")
                        elif pos + 8 + length > size:
                            self._need = pos + 8 + length
                            break
                        else:
                            pos += 8 + length
                    elif tag == _SEQUENCE_END and frame.end < 0:
                        stack.pop()
                        pos += 8
                    else:
                        raise _malformed("a sequence holds something other than items")
                    continue
                dataset = frame.node
                assert isinstance(dataset, _Dataset)
            else:
                if pos + 8 > size:
                    break
                encoding = top_encoding
                dataset = self._batch
            # An element (or an item's end) of ``dataset``.
            at = pos - off
            if encoding.explicit:
                group, element, vr_code, length = encoding.explicit_header.unpack_from(buf, at)
                if group == 0xFFFE:
                    header_size = 8
                    (length,) = encoding.u32.unpack_from(buf, at + 4)
                elif vr_code in _SHORT_VRS:
                    header_size = 8
                elif vr_code in _LONG_VRS:
                    if pos + 12 > size:
                        break
                    header_size = 12
                    (length,) = encoding.u32.unpack_from(buf, at + 8)
                else:
                    raise _malformed("unknown VR")
            else:
                group, element, length = encoding.item_header.unpack_from(buf, at)
                header_size = 8
                vr_code = b""
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and stack and stack[-1].end < 0:
                    stack.pop()
                    pos += 8
                    continue
                raise _malformed("unexpected delimiter")
            value_at = pos + header_size
            if encoding.explicit:
                is_sequence = vr_code == b"SQ" or (vr_code == b"UN" and length == _UNDEFINED)
                vr = ""
            else:
                vr = _implicit_vr(tag)
                is_sequence = vr == "SQ" or (length == _UNDEFINED and vr in ("", "UN"))
            if not stack:
                # The top-level decisions, before taking the element.
                if not past_series and tag > SERIES_INSTANCE_UID:
                    past_series = self._past_series = True
                    if self._admit is not None:  # it sees the elements up to (0020,000E) only
                        self._pos = pos
                        return _FIRST
                    # The first batch goes on over what is in hand (one lookup per instance,
                    # not two), or is cut back to here (_cut_back).
                    self._first_at, self._first_held = pos, dataset.counts()
                if not past_series:
                    pass  # held, whatever its size: the first batch decides
                elif not is_sequence and (length == _UNDEFINED or length >= large):
                    self._pos = pos
                    self._value_at = value_at
                    self._value_length = length
                    return _LARGE
                elif pos - self._base >= large:
                    self._pos = pos
                    return _BATCH
            if is_sequence:
                seq_encoding = encoding if vr_code != b"UN" else _IMPLICIT_LITTLE
                seq = _Sequence(tag, value_at - 4, length, encoding)
                dataset.seqs.append(seq)
                end = -1 if length == _UNDEFINED else value_at + length
                stack.append(_Frame(_SEQ, end, seq_encoding, seq))
                pos = value_at
                continue
            if length == _UNDEFINED:
                stack.append(_Frame(_FRAGMENTS, -1, encoding, None))
                pos = value_at
                continue
            end = value_at + length
            if end > size:
                self._need = end
                break
            if tag in self._tags or vr_code == b"UI" or vr == "UI":
                if encoding.explicit:
                    vr = vr_code.decode("ascii")
                header = bytes(buf[at : at + header_size])
                value = bytes(buf[value_at - off : end - off])
                dataset.elements.append(_Element(tag, vr, pos, header, value, encoding))
            elif element == 0 and length == 4:
                (group_length,) = encoding.u32.unpack_from(buf, value_at - off)
                if dataset.group_lengths is None:
                    dataset.group_lengths = []
                dataset.group_lengths.append((group, value_at, group_length))
            pos = end
        self._pos = pos
        if self._first_at >= 0:
            # The instance is decided as soon as (0020,000E) is passed, whatever comes next:
            # on what is in hand, but not on part of a sequence.
            if stack:
                self._cut_back()
            return _FIRST
        return _MORE

    def _cut_back(self) -> None:
        """End the first batch at the first element after (0020,000E) (see _scan)."""
        self._stack.clear()
        self._batch.cut(self._first_held)
        self._pos = self._first_at

    # -- output ---------------------------------------------------------------------------

    async def _flush(self, out: list[_Chunk], *, first: bool) -> None:
        """Translate the held batch and send it, up to the parse position."""
        batch = self._batch
        patches: list[tuple[int, int, bytes]] = []
        if first and self._admit is not None and not await self._admit(batch):
            self.dropped = True
            return
        if batch.elements or batch.seqs:
            collector = UidCollector()
            collect_uids(batch, collector)
            if collector:
                self._translation = await self._resolve(collector)
            translation = self._translation or Translation(studies={}, series={})
            keep = apply_translation(batch, translation, study_known=self._study_known)
            if first:
                if not keep:
                    self.dropped = True
                    return
                if batch.get(STUDY_INSTANCE_UID):
                    self._study_known = True
            batch.patches(patches)
        if first:
            self._first_done = True
            self._first_at = -1
        self._batch = _Dataset(-1, _UNDEFINED, self._encoding)
        start, end, off = self._base, self._pos, self._off
        if start == end:
            return
        with memoryview(self._buf) as view:
            if not patches:
                out.append(bytes(view[start - off : end - off]))
            else:
                patches.sort()
                pieces: list[_Chunk] = []
                for at, until, replacement in patches:
                    pieces += (view[start - off : at - off], replacement)
                    start = until
                pieces.append(view[start - off : end - off])
                out.append(b"".join(pieces))
                del pieces
        self._base = end
