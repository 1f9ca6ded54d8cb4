"""Searches that show only the rows of visible examinations, paging exactly.

For a caller who may see more examinations than fit in a UID list (``[access] inject_max``),
the upstream is paged through with the client's own query and the rows of other examinations
are dropped on the way, so that ``offset``, ``limit`` and ``Warning: 299`` stay exact.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any, Final

import orjson

from .._dicom import STUDY_INSTANCE_UID, json_value, split_parts, xml_value
from .._errors import UpstreamError
from .._headers import parse_media_type, wants_dicom_xml
from .._identifiers import UidFormatter
from .._request import DicomWebRequest
from .._scope import count_upstream_rows
from .._subrequests import empty_search, run_search, search_json
from .._types import ASGIApp, Receive, Scope, Send
from ._policy import Visible

__all__ = ["FILTER_PAGE", "filtered_search"]

#: Rows asked of the upstream per page when filtering, at most.
FILTER_PAGE: Final = 500


async def filtered_search(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    request: DicomWebRequest,
    visible: Visible,
    formatter: UidFormatter,
) -> None:
    """Answer a search with the rows of visible examinations only, paging exactly.

    The upstream is asked page by page (at most ``FILTER_PAGE`` rows, sized from the client's
    ``offset`` and ``limit``, in its own stable order) with the client's query; rows of other
    examinations are dropped, then the client's ``offset`` rows skipped and ``limit`` rows
    kept. ``Warning: 299`` is set only when one more visible row exists. Rows are DICOM JSON
    objects, or DICOM XML parts when the client asks for XML. With ``visible`` :data:`ALL`
    nothing is dropped: the paging is exact although one upstream row may become several.
    """
    xml = wants_dicom_xml(scope)
    offset, limit, query = _paging(request.query)
    kept: list[bytes] = []
    skipped = 0
    more = False
    upstream_offset = 0
    # Rows wanted (one more tells whether there are more): the first page asks for them and
    # a quarter more, later ones for what is missing at the share of visible rows seen.
    wanted = offset + limit + 1 if limit is not None else None
    page_size = FILTER_PAGE if wanted is None else min(FILTER_PAGE, wanted + wanted // 4 + 8)
    while not more:
        page_query = (*query, ("limit", str(page_size)), ("offset", str(upstream_offset)))
        page = replace(request, query=page_query)
        inner = dict(scope)
        seen = count_upstream_rows(inner)
        rows = await (_xml_rows if xml else _json_rows)(app, inner, receive, page)
        for study, row in rows:
            exam = formatter.exam_id(study) if study is not None else None
            if exam is None or (isinstance(visible, frozenset) and exam not in visible):
                continue
            if skipped < offset:
                skipped += 1
            elif limit is None or len(kept) < limit:
                kept.append(row)
            else:
                more = True
                break
        if seen[0] < page_size:  # the upstream's own count: rows dropped on the way count too
            break
        upstream_offset += page_size
        if wanted is not None:
            found = skipped + len(kept)
            share = max(found, 1) / upstream_offset
            page_size = min(FILTER_PAGE, int((wanted - found) / share * 1.25) + 8)
    if xml and not kept:
        await empty_search(scope, send)
        return
    if xml:
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: {_XML}\r\n\r\n".encode()
        body = b"".join(head + row + b"\r\n" for row in kept) + f"--{boundary}--".encode()
        media = f'multipart/related; type="{_XML}"; boundary={boundary}'.encode()
    else:
        body = b"[" + b",".join(kept) + b"]"
        media = b"application/dicom+json"
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
    if more:
        warning = '299 shanoir-dicomweb-proxy "There are additional results that can be requested"'
        headers.append((b"warning", warning.encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_XML = "application/dicom+xml"
_Rows = list[tuple[str | None, bytes]]


async def _json_rows(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest
) -> _Rows:
    """One page of a search in DICOM JSON: each row's study UID, and the row."""
    rows = await search_json(app, scope, receive, request)
    return [(_study_of(row), orjson.dumps(row)) for row in rows]


def _study_of(row: dict[str, Any]) -> str | None:
    study = json_value(row, STUDY_INSTANCE_UID)
    return study if isinstance(study, str) else None


async def _xml_rows(
    app: ASGIApp, scope: Scope, receive: Receive, request: DicomWebRequest
) -> _Rows:
    """One page of a search in DICOM XML: each part's study UID, and the part."""
    content_type, body = await run_search(app, scope, receive, request, accept=_XML.encode())
    if not body:
        return []
    media = parse_media_type(content_type.decode("latin-1"))
    boundary = media.params.get("boundary")
    if media.type == _XML:
        parts = [body]
    elif media.type == "multipart/related" and boundary:
        parts = await split_parts(boundary.encode("latin-1"), body)
    else:
        raise UpstreamError(f"the upstream answered an XML search with {media.type}")
    return [(xml_value(part, STUDY_INSTANCE_UID), part) for part in parts]


def _paging(
    query: tuple[tuple[str, str], ...],
) -> tuple[int, int | None, tuple[tuple[str, str], ...]]:
    offset, limit = 0, None
    rest: list[tuple[str, str]] = []
    for key, value in query:
        if key in ("offset", "limit"):  # routing has checked they are numbers
            if key == "offset":
                offset = int(value)
            else:
                limit = int(value) or None  # limit=0: no limit, as in Orthanc
        else:
            rest.append((key, value))
    return offset, limit, tuple(rest)
