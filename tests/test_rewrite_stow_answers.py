"""Uploads through the mapping, in process, in front of scripted PACS answers: JSON or XML
answers are both read, and instances a PACS answer does not account for are looked up."""

from __future__ import annotations

import io
from typing import Any

import httpx
import orjson
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from shanoir_dicomweb_proxy import DicomWebProxy, Settings, Upstream
from shanoir_dicomweb_proxy._backends import StaticIdentifierMap
from shanoir_dicomweb_proxy._store import ImportRow

from .support.asgi import CORE, call

STUDY, SERIES = "1.2.840.99.1", "1.2.840.99.1.1"
PUBLIC_STUDY, PUBLIC_SERIES = "1.4.1.42", "1.4.2.7"
MAPPING = {"backend": "static", "study_root": "1.4.1", "series_root": "1.4.2", "file": "x"}
BOUNDARY = "b0undary"


def _part10() -> tuple[str, bytes]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = PUBLIC_STUDY, PUBLIC_SERIES
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds.SOPInstanceUID, buffer.getvalue()


class _Pacs:
    """Stores the first instance of every upload and says so in ``style``."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.held: set[str] = set()
        self.uploads: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = request.read()
            self.uploads.append(body)
            first = pydicom.dcmread(io.BytesIO(body.split(b"\r\n\r\n", 1)[1]), force=True)
            self.held.add(first.SOPInstanceUID)
            return self._stow_answer(first.SOPInstanceUID)
        wanted = set(request.url.params["SOPInstanceUID"].split(","))
        rows = [
            {
                "0020000D": {"vr": "UI", "Value": [STUDY]},
                "0020000E": {"vr": "UI", "Value": [SERIES]},
                "00080018": {"vr": "UI", "Value": [uid]},
            }
            for uid in sorted(wanted & self.held)
        ]
        return _response(200, orjson.dumps(rows), "application/dicom+json")

    def _stow_answer(self, stored: str) -> httpx.Response:
        if self.style == "orthanc-400":  # stored, yet 400 and no word of the others
            return _response(400, b'{"HttpError": "Bad Request"}', "")
        if self.style == "xml":
            xml = (
                '<?xml version="1.0"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19'
                '/models/NativeDICOM"><DicomAttribute tag="00081199" vr="SQ"><Item number="1">'
                '<DicomAttribute tag="00081155" vr="UI"><Value number="1">'
                f"{stored}</Value></DicomAttribute></Item></DicomAttribute></NativeDicomModel>"
            )
            return _response(202, xml.encode(), "application/dicom+xml")
        raise AssertionError(self.style)


def _response(status: int, body: bytes, media: str) -> httpx.Response:
    headers = {"content-type": media} if media else {}
    return httpx.Response(status, stream=httpx.ByteStream(body), headers=headers)


def _app(pacs: _Pacs) -> DicomWebProxy:
    data: dict[str, Any] = {**CORE, "mapping": MAPPING}
    data["upstream"] = {"url": "http://pacs.invalid/dicom-web"}
    settings = Settings.from_dict(data)
    upstream = Upstream(settings.upstream, transport=httpx.MockTransport(pacs))
    rows = [ImportRow(42, STUDY, 7, SERIES)]
    return DicomWebProxy(settings, upstream=upstream, identifiers=StaticIdentifierMap(rows))


@pytest.mark.parametrize("style", ["orthanc-400", "xml"])
async def test_what_the_pacs_really_stored_is_reported(style: str) -> None:
    pacs = _Pacs(style)
    (first, one), (second, two) = _part10(), _part10()
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in (one, two)
    )
    body += f"--{BOUNDARY}--\r\n".encode()
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    answer = await call(
        _app(pacs),
        "POST",
        b"/dicomweb/studies",
        headers=[(b"content-type", content_type.encode())],
        body=body,
    )
    assert answer.status == 202, answer.body
    result = orjson.loads(answer.body)
    (stored,) = result["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [first]
    # The RetrieveURL is the proxy's, in public UIDs.
    url = stored["00081190"]["Value"][0]
    assert f"/dicomweb/studies/{PUBLIC_STUDY}/series/{PUBLIC_SERIES}/instances/{first}" in url
    (failed,) = result["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [second]
    assert failed["00081197"]["Value"] == [0x0110]
    # The PACS got real UIDs only.
    (upload,) = pacs.uploads
    assert PUBLIC_STUDY.encode() not in upload and STUDY.encode() in upload
