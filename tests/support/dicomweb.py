"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

import httpx

OCTET = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM = 'multipart/related; type="application/dicom"'
XML = 'multipart/related; type="application/dicom+xml"'


def parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: (headers, body) each."""
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + response.content)
    assert message.is_multipart(), response.headers["content-type"]
    return [
        ({k.lower(): str(v) for k, v in part.items()}, part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


def relink(data: bytes, direct_base: str, proxy_base: str) -> bytes:
    """A direct answer with its links pointing at the proxy, for comparison."""
    return data.replace(direct_base.encode() + b"/", proxy_base.encode() + b"/")
