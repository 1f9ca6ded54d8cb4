"""The route grammar: what is a DICOMweb request, and what never reaches the upstream."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shanoir_dicomweb_proxy import (
    BadRequest,
    Level,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    Resource,
    Service,
)
from shanoir_dicomweb_proxy._routing import Route, parse_route

from .support.asgi import build, call

S, SE, SOP = "1.2.840.1", "1.2.840.1.2", "1.2.840.1.2.3"


def route(path: str, method: str = "GET", query: bytes = b"", base: str = "/dicomweb"):
    scope = {"type": "http", "path": path, "method": method, "query_string": query}
    return parse_route(scope, base_path=base)[0]


@pytest.mark.parametrize(
    ("path", "service", "resource", "level", "ids"),
    [
        ("/studies", Service.QIDO, Resource.SEARCH, Level.STUDY, ()),
        ("/series", Service.QIDO, Resource.SEARCH, Level.SERIES, ()),
        ("/instances", Service.QIDO, Resource.SEARCH, Level.INSTANCE, ()),
        (f"/studies/{S}/series", Service.QIDO, Resource.SEARCH, Level.SERIES, (S,)),
        (f"/studies/{S}/instances", Service.QIDO, Resource.SEARCH, Level.INSTANCE, (S,)),
        (
            f"/studies/{S}/series/{SE}/instances",
            Service.QIDO,
            Resource.SEARCH,
            Level.INSTANCE,
            (S, SE),
        ),
        (f"/studies/{S}", Service.WADO, Resource.RETRIEVE, Level.STUDY, (S,)),
        (f"/studies/{S}/series/{SE}", Service.WADO, Resource.RETRIEVE, Level.SERIES, (S, SE)),
        (
            f"/studies/{S}/series/{SE}/instances/{SOP}",
            Service.WADO,
            Resource.RETRIEVE,
            Level.INSTANCE,
            (S, SE, SOP),
        ),
        (f"/studies/{S}/metadata", Service.WADO, Resource.METADATA, Level.STUDY, (S,)),
        (
            f"/studies/{S}/series/{SE}/metadata",
            Service.WADO,
            Resource.METADATA,
            Level.SERIES,
            (S, SE),
        ),
        (
            f"/studies/{S}/series/{SE}/instances/{SOP}/metadata",
            Service.WADO,
            Resource.METADATA,
            Level.INSTANCE,
            (S, SE, SOP),
        ),
        (f"/studies/{S}/rendered", Service.WADO, Resource.RENDERED, Level.STUDY, (S,)),
        (
            f"/studies/{S}/series/{SE}/thumbnail",
            Service.WADO,
            Resource.THUMBNAIL,
            Level.SERIES,
            (S, SE),
        ),
        (
            f"/studies/{S}/series/{SE}/instances/{SOP}/frames/1,3",
            Service.WADO,
            Resource.FRAMES,
            Level.INSTANCE,
            (S, SE, SOP),
        ),
        (
            f"/studies/{S}/series/{SE}/instances/{SOP}/frames/2/rendered",
            Service.WADO,
            Resource.RENDERED,
            Level.INSTANCE,
            (S, SE, SOP),
        ),
        (
            f"/studies/{S}/series/{SE}/instances/{SOP}/frames/2/thumbnail",
            Service.WADO,
            Resource.THUMBNAIL,
            Level.INSTANCE,
            (S, SE, SOP),
        ),
        (
            f"/studies/{S}/series/{SE}/instances/{SOP}/bulk/7fe00010",
            Service.WADO,
            Resource.BULKDATA,
            Level.INSTANCE,
            (S, SE, SOP),
        ),
        (
            f"/studies/{S}/series/{SE}/instances/{SOP}/bulkdata/00540016/0/00181072",
            Service.WADO,
            Resource.BULKDATA,
            Level.INSTANCE,
            (S, SE, SOP),
        ),
    ],
)
def test_routes(
    path: str, service: Service, resource: Resource, level: Level, ids: tuple[str, ...]
) -> None:
    request = route("/dicomweb" + path)
    assert (request.service, request.resource, request.level) == (service, resource, level)
    assert tuple(x for x in (request.study, request.series, request.instance) if x) == ids
    # The upstream path is rebuilt from the parsed request and is the same route.
    assert request.path() == path


def test_store_routes() -> None:
    assert route("/dicomweb/studies", "POST").path() == "/studies"
    request = route(f"/dicomweb/studies/{S}", "POST")
    assert (request.service, request.study, request.path()) == (Service.STOW, S, f"/studies/{S}")


def test_frames_are_parsed() -> None:
    assert route(f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/frames/1,2,128").frames == (
        1,
        2,
        128,
    )


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb",
        "/dicomweb/",
        "/dicomweb/studies/",
        "/studies",
        "/dicomwebx/studies",
        f"/dicomweb/studies/{S}/series/{SE}/series",
        f"/dicomweb/studies/{S}/studies",
        f"/dicomweb/studies/{S}/reject/113001^DCM",
        f"/dicomweb/studies/{S}/../../admin",
        "/dicomweb/studies/../studies",
        "/dicomweb/studies/1..2",
        "/dicomweb/studies/.1",
        "/dicomweb/studies/1.2.",
        "/dicomweb/studies/" + "1." * 32 + "1",  # 65 characters
        f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/frames/1,,2",
        f"/dicomweb/studies/{S}/series/{SE}/frames/1",
        f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/bulk",
        f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/bulk/../x",
        f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/metadata/x",
        "/dicomweb/workitems",
        "/dicomweb/wado/x",
    ],
)
def test_not_routes(path: str) -> None:
    with pytest.raises(NotFound):
        route(path)


@pytest.mark.parametrize(
    "path",
    [
        "//dicomweb/studies",
        "/dicomweb//studies",
        f"/dicomweb/studies//{S}//series/{SE}/",
    ],
)
def test_repeated_slashes_are_merged(path: str) -> None:
    """Clients joining a base ending in "/" with a path starting with one: served as nginx
    (merge_slashes) and Orthanc serve them; the upstream path is rebuilt from the parse."""
    request = route(path.rstrip("/"))
    assert request.path() in ("/studies", f"/studies/{S}/series/{SE}")


@pytest.mark.parametrize("frames", ["0", "1,0", "1234567890"])
def test_frame_numbers_start_at_one(frames: str) -> None:
    with pytest.raises(BadRequest, match="frame numbers"):
        route(f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/frames/{frames}")


def _wado(query: str) -> Route:
    scope = {"type": "http", "path": "/dicomweb/wado", "method": "GET", "query_string": query}
    return parse_route(scope, base_path="/dicomweb")


WADO = f"requestType=WADO&studyUID={S}&seriesUID={SE}&objectUID={SOP}".encode()


def test_wado_uri_is_the_wado_rs_resource_it_names() -> None:
    """PS3.18 §9: the instance as application/dicom (retrieve, so download rights), or its
    rendered image (read), with the rendering parameters in WADO-RS form."""
    instance = _wado(WADO + b"&contentType=application%2Fdicom&transferSyntax=1.2.840.10008.1.2.1")
    assert instance.request.service is Service.WADO_URI
    assert instance.request.resource is Resource.RETRIEVE
    assert instance.request.path() == f"/studies/{S}/series/{SE}/instances/{SOP}"
    assert instance.accept == b"application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    image = _wado(
        WADO + b"&rows=64&columns=32&windowCenter=40&windowWidth=400.5&imageQuality=80"
        b"&frameNumber=3&charset=utf-8"
    )
    assert image.request.resource is Resource.RENDERED
    assert image.request.path() == f"/studies/{S}/series/{SE}/instances/{SOP}/frames/3/rendered"
    assert image.request.query == (
        ("viewport", "32,64"),
        ("window", "40,400.5,linear"),
        ("quality", "80"),
    )
    assert image.accept == b"image/jpeg"  # the default
    assert _wado(WADO + b"&contentType=image/png").accept == b"image/png"
    with pytest.raises(MethodNotAllowed):
        parse_route(
            {"type": "http", "path": "/dicomweb/wado", "method": "POST", "query_string": WADO},
            base_path="/dicomweb",
        )


@pytest.mark.parametrize(
    "query",
    [
        b"studyUID=1.2&seriesUID=1.3&objectUID=1.4",  # no requestType
        WADO.replace(f"objectUID={SOP}".encode(), b"objectUID=x"),
        WADO.replace(f"&seriesUID={SE}".encode(), b""),
        WADO + b"&anonymize=yes",
        WADO + b"&region=0.1,0.1,0.5,0.5",
        WADO + b"&windowCenter=40",
        WADO + b"&rows=0",
        WADO + b"&rows=" + b"9" * 5000,
        WADO + b"&imageQuality=101",
        WADO + b"&contentType=application/dicom&transferSyntax=x",
    ],
)
def test_wado_uri_refuses_what_it_cannot_do(query: bytes) -> None:
    with pytest.raises(BadRequest):
        _wado(query)


@pytest.mark.parametrize(
    "viewport", ["99999,99999", "65536,4", "8193,8", "0,0", "-5,3", "x,1", "512"]
)
@pytest.mark.parametrize("resource", ["rendered", "thumbnail", "frames/1/rendered"])
def test_a_rendered_image_larger_than_8192_pixels_a_side_is_refused(
    viewport: str, resource: str
) -> None:
    """Orthanc 1.10 drops the connection on a side over 65,500 pixels and dies on
    viewport=99999,99999 (found by tests/test_fuzz.py): the proxy answers 400 first."""
    path = f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/{resource}"
    with pytest.raises(BadRequest, match="viewport"):
        route(path, query=f"viewport={viewport}".encode())
    for fine in (b"viewport=8192,8192", b"viewport=32%2C64", b"viewport=64,64,0,0,-64,64"):
        assert route(path, query=fine).query[0][0] == "viewport"
    with pytest.raises(BadRequest):
        _wado(WADO + b"&rows=8193")
    assert _wado(WADO + b"&rows=8192").request.query == (("viewport", "8192,8192"),)


def test_wado_uri_content_types() -> None:
    with pytest.raises(NotAcceptable):
        _wado(WADO + b"&contentType=text/html")
    assert _wado(WADO + b"&contentType=text/html,*/*").accept == b"image/jpeg"


def test_methods() -> None:
    with pytest.raises(MethodNotAllowed) as error:
        route(f"/dicomweb/studies/{S}", "DELETE")
    assert error.value.allow == ("GET", "HEAD", "POST", "OPTIONS")
    with pytest.raises(MethodNotAllowed):
        route(f"/dicomweb/studies/{S}/series", "POST")
    with pytest.raises(MethodNotAllowed):
        route("/dicomweb/series", "PUT")


def test_query_is_decoded_then_reencoded_for_the_upstream() -> None:
    request = route(
        "/dicomweb/studies",
        query=b"PatientName=Doe%5EJ%2A&includefield=00081030%2C00080060&includefield=00100010"
        b"&StudyDescription=a+b%20c&PatientID=A%3FB&x=%26%3D%2B%25",
    )
    assert request.query == (
        ("PatientName", "Doe^J*"),
        ("includefield", "00081030,00080060"),
        ("includefield", "00100010"),
        ("StudyDescription", "a b c"),
        ("PatientID", "A?B"),
        ("x", "&=+%"),
    )
    assert request.query_string() == (
        "PatientName=Doe^J*&includefield=00081030,00080060&includefield=00100010"
        "&StudyDescription=a%20b%20c&PatientID=A?B&x=%26%3D%2B%25"
    )


@pytest.mark.parametrize(
    "query",
    [
        b"limit=-1",
        b"offset=x",
        b"limit=1e3",
        b"a%ff=1",
        b"PatientName=%C3%28",
        b"a b=1",
        b"limit=" + b"9" * 24,
        b"offset=2147483648",
        b"limit=" + b"1" * 5000,
    ],
)
def test_bad_queries(query: bytes) -> None:
    with pytest.raises(BadRequest):
        route("/dicomweb/studies", query=query)


def test_base_path_empty_and_mounted() -> None:
    assert route("/studies", base="").level is Level.STUDY
    scope = {"type": "http", "path": "/app/dw/studies", "root_path": "/app", "method": "GET"}
    assert parse_route(scope, base_path="/dw")[0].resource is Resource.SEARCH


# --- the whole stack, fuzzed -----------------------------------------------------------

_SEGMENTS = st.sampled_from(
    [
        "studies", "series", "instances", "metadata", "frames", "rendered", "thumbnail",
        "bulk", "bulkdata", "..", ".", "", S, SE, SOP, "1,2", "0", "7fe00010", "%2F", "%2e%2e",
        "%00", "x", "studies%2F1.2", "\u00e9", "1.2.3;x", "*",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"]),
    segments=st.lists(_SEGMENTS | st.text(max_size=12), max_size=9),
    query=st.binary(max_size=40) | st.sampled_from([b"limit=2", b"a=%zz", b"limit=x"]),
)
def test_fuzzed_requests_never_500_and_invalid_never_reach_upstream(
    method: str, segments: list[str], query: bytes
) -> None:
    calls: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(
            200, stream=httpx.ByteStream(b"[]"), headers={"content-type": "application/dicom+json"}
        )

    raw_path = ("/dicomweb/" + "/".join(segments)).encode("utf-8")
    app = build(upstream)
    answer = asyncio.run(call(app, method, raw_path, query))
    assert answer.status < 500
    if answer.status >= 400:
        assert calls == []
        assert answer.headers[b"content-type"] == b"application/problem+json"
    for request in calls:
        # Whatever reached the upstream is a rebuilt, valid route below its base.
        assert request.url.path.startswith("/dicom-web/")
        assert ".." not in request.url.path and "%" not in request.url.path


# --- content negotiation ---------------------------------------------------------------


async def _status(path: str, method: str = "GET", **headers: str) -> int:
    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(b""))

    encoded = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    path, _, query = path.partition("?")
    answer = await call(build(upstream), method, path.encode(), query.encode(), headers=encoded)
    return answer.status


@pytest.mark.parametrize(
    ("path", "accept", "status"),
    [
        ("/dicomweb/studies", "application/dicom+json", 200),
        ("/dicomweb/studies", "text/html", 406),
        ("/dicomweb/studies", "text/html, */*;q=0.1", 200),
        (f"/dicomweb/studies/{S}/metadata", 'multipart/related; type="application/dicom+xml"', 200),
        (f"/dicomweb/studies/{S}/metadata", "image/jpeg", 406),
        (f"/dicomweb/studies/{S}", 'multipart/related; type="application/dicom"', 200),
        (f"/dicomweb/studies/{S}", "application/*", 200),
        (f"/dicomweb/studies/{S}", "image/png", 406),
        (f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/frames/1", "image/jls", 200),
        (
            f"/dicomweb/studies/{S}/series/{SE}/instances/{SOP}/frames/1",
            "application/dicom+json",
            406,
        ),
        (f"/dicomweb/studies/{S}/rendered", "image/*", 200),
        (f"/dicomweb/studies/{S}/rendered", "application/dicom", 406),
        (f"/dicomweb/studies/{S}/series/{SE}/thumbnail", "application/pdf", 406),
    ],
)
async def test_accept(path: str, accept: str, status: int) -> None:
    assert await _status(path, accept=accept) == status


async def test_accept_query_parameter_overrides_header() -> None:
    path = f"/dicomweb/studies/{S}/rendered?accept=image/png"
    assert await _status(path, accept="application/dicom") == 200


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ('multipart/related; type="application/dicom"; boundary=x', 200),
        ("multipart/related; type=application/dicom; boundary=x", 200),
        ("multipart/related; type=application/dicom", 400),
        ("application/dicom", 415),
        ("multipart/form-data; boundary=x", 415),
        (None, 415),
    ],
)
async def test_stow_content_type(content_type: str | None, status: int) -> None:
    headers = {"content_type": content_type} if content_type else {}
    assert await _status("/dicomweb/studies", "POST", **headers) == status
