"""Header handling: media types, what crosses the proxy, the public base URL."""

from __future__ import annotations

import pytest

from shanoir_dicomweb_proxy._headers import (
    TrustedProxies,
    parse_media_type,
    public_base_url,
    request_headers_for_upstream,
    response_headers_for_client,
    split_accept,
    wants_dicom_xml,
)


@pytest.mark.parametrize(
    "value",
    [
        'multipart/related; type="application/dicom"; boundary=abc',
        "multipart/related; type=application/dicom; boundary=abc",
        "Multipart/Related;Type=application/dicom;boundary=abc",
    ],
)
def test_quoted_and_unquoted_type(value: str) -> None:
    media = parse_media_type(value)
    assert media.type == "multipart/related"
    assert media.related_type == "application/dicom"
    assert media.params["boundary"] == "abc"


def test_quoted_pair_in_a_parameter_is_unescaped() -> None:
    media = parse_media_type(r'multipart/related; type="a\"b\\c"; boundary="x\y"')
    assert media.related_type == 'a"b\\c'
    assert media.params["boundary"] == "xy"


def test_accept_split_respects_quotes() -> None:
    accept = 'multipart/related; type="application/octet-stream; transfer-syntax=*", image/jpeg'
    first, second = split_accept(accept)
    assert first.related_type == "application/octet-stream; transfer-syntax=*"
    assert second.type == "image/jpeg"


def test_request_headers_allow_list() -> None:
    headers = [
        (b"Accept", b"application/dicom+json"),
        (b"Authorization", b"Bearer t"),
        (b"Cookie", b"a=b"),
        (b"Host", b"proxy"),
        (b"Forwarded", b"for=1.2.3.4"),
        (b"If-None-Match", b'"x"'),
        (b"Content-Type", b"multipart/related; boundary=x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close, accept"),
    ]
    kept = dict(request_headers_for_upstream(headers))
    # Accept is named by Connection, so it is hop-by-hop on this request.
    assert kept == {b"if-none-match": b'"x"', b"content-type": b"multipart/related; boundary=x"}


def test_the_proxys_request_id_replaces_the_clients() -> None:
    headers = [(b"X-Request-ID", b"client"), (b"Accept", b"*/*")]
    assert request_headers_for_upstream(headers, request_id="proxy") == [
        (b"accept", b"*/*"),
        (b"x-request-id", b"proxy"),
    ]
    assert request_headers_for_upstream(headers) == [
        (b"x-request-id", b"client"),
        (b"accept", b"*/*"),
    ]


def test_response_headers_allow_list() -> None:
    headers = [
        (b"Content-Type", b"application/dicom+json"),
        (b"Content-Length", b"2"),
        (b"Set-Cookie", b"s=1"),
        (b"WWW-Authenticate", b"Basic"),
        (b"Keep-Alive", b"timeout=1"),
        (b"Connection", b"keep-alive"),
        (b"ETag", b'"1"'),
        (b"Warning", b'299 proxy "There are additional results"'),
    ]
    kept = [name for name, _ in response_headers_for_client(headers)]
    assert kept == [b"content-type", b"content-length", b"etag", b"warning"]


def _scope(
    *headers: tuple[bytes, bytes],
    server: tuple[str, int] = ("127.0.0.1", 8080),
    client: tuple[str, int] | None = ("127.0.0.1", 50000),
) -> dict:
    return {
        "headers": list(headers),
        "server": server,
        "client": client,
        "scheme": "http",
        "root_path": "",
    }


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"host", b"gw.example.org:9000")], "http://gw.example.org:9000/dw"),
        # dicomweb-client drops the port from Host: the socket's port is put back.
        ([(b"host", b"127.0.0.1")], "http://127.0.0.1:8080/dw"),
        ([(b"forwarded", b'for=1.1.1.1;host="gw.org";proto=https')], "https://gw.org/dw"),
        ([(b"x-forwarded-host", b"gw.org"), (b"x-forwarded-proto", b"https")], "https://gw.org/dw"),
        # Anything that is not a host name never reaches a body.
        ([(b"host", b'evil"/><x')], "http://127.0.0.1:8080/dw"),
        ([(b"forwarded", b"host=a b")], "http://127.0.0.1:8080/dw"),
        ([], "http://127.0.0.1:8080/dw"),
    ],
)
def test_public_base_url(headers: list[tuple[bytes, bytes]], expected: str) -> None:
    assert public_base_url(_scope(*headers), public_url="", base_path="/dw") == expected


FORGED = [
    (b"host", b"gw.example.org"),
    (b"forwarded", b'host="evil.example";proto=https'),
    (b"x-forwarded-host", b"evil.example"),
]


@pytest.mark.parametrize(
    ("client", "allow", "trusted"),
    [
        (("127.0.0.1", 1), ("127.0.0.1", "::1"), True),
        (("::1", 1), ("127.0.0.1", "::1"), True),
        (("203.0.113.9", 1), ("127.0.0.1", "::1"), False),  # a client on the network
        (("10.2.3.4", 1), ("10.0.0.0/8",), True),
        (("11.2.3.4", 1), ("10.0.0.0/8",), False),
        (("::ffff:10.2.3.4", 1), ("10.0.0.0/8",), True),  # IPv4-mapped, from a dual-stack socket
        (("203.0.113.9", 1), ("*",), True),
        (None, ("127.0.0.1",), False),  # a Unix socket: no peer address
        (("not an address", 1), ("127.0.0.1",), False),
    ],
)
def test_forwarded_headers_only_from_allowed_peers(
    client: tuple[str, int] | None, allow: tuple[str, ...], trusted: bool
) -> None:
    scope = _scope(*FORGED, client=client)
    base = public_base_url(scope, public_url="", base_path="/dw", trusted=TrustedProxies(allow))
    assert base == ("https://evil.example/dw" if trusted else "http://gw.example.org:8080/dw")


def test_each_list_of_trusted_proxies_decides_for_itself() -> None:
    # Decisions are remembered per peer address: asked alternately, each list keeps its own.
    scope = _scope(*FORGED, client=("10.1.2.3", 1))
    lists = [TrustedProxies(("10.0.0.0/8",)), TrustedProxies(("127.0.0.1",))] * 2
    assert [trusted.trusts(scope) for trusted in lists] == [True, False, True, False]


@pytest.mark.parametrize(
    ("host", "kept"),
    [
        (b"a" * 10_000, False),  # would make every link, and so every answer, 10 KB longer
        (b"a" * 63 + b".example.org", True),
        (b"a" * 64 + b".example.org", False),  # a label is at most 63 characters
        (b".".join([b"a" * 61] * 4) + b":8443", True),  # 247 characters and a port
        (b".".join([b"a" * 63] * 4) + b":8443", False),  # 255: longer than a host name may be
        (b"[2001:db8::1]:8443", True),
        (b"gw.example.org:8443:1", False),
        (b"gw..example.org", False),
        (b"-gw.example.org", False),
    ],
)
def test_client_supplied_host_is_bounded(host: bytes, kept: bool) -> None:
    base = public_base_url(_scope((b"host", host)), public_url="", base_path="/dw")
    port = "" if host.endswith((b":8443", b"]:8443")) else ":8080"  # the socket's, when none
    assert base == (f"http://{host.decode()}{port}/dw" if kept else "http://127.0.0.1:8080/dw")


def test_the_socket_address_of_ipv6_is_bracketed() -> None:
    scope = _scope(server=("::1", 8080))
    assert public_base_url(scope, public_url="", base_path="/dw") == "http://[::1]:8080/dw"


def test_public_url_setting_wins() -> None:
    scope = _scope((b"host", b"other"))
    assert (
        public_base_url(scope, public_url="https://x.org/p", base_path="/dw") == "https://x.org/p"
    )


@pytest.mark.parametrize(
    ("accept", "xml"),
    [
        (None, False),
        ("application/dicom+json", False),
        ("application/dicom+xml", True),
        ('multipart/related; type="application/dicom+xml"', True),
        ("multipart/related; type=application/dicom+xml", True),
        ("application/dicom+xml, application/dicom+json", False),  # JSON will do
        ("multipart/related; type=application/dicom+xml, */*;q=0.1", False),
        ("application/xml", False),  # not DICOM XML
        ('multipart/related; type="application/dicom"', False),
    ],
)
def test_wants_dicom_xml(accept: str | None, xml: bool) -> None:
    headers = [] if accept is None else [(b"accept", accept.encode())]
    assert wants_dicom_xml({"type": "http", "headers": headers}) is xml
