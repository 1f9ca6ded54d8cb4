"""Signed links in process (docs/links.md), check by check, with a scripted PACS that records
what it is asked: a link reads its one examination (its one acquisition), for its action,
until it expires, whatever else comes with the request; only an allowed caller makes one.

The same promises end to end, against the real Orthanc, are in test_signed_links.py.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import pytest
from joserfc import jws
from joserfc.jwk import OctKey

from shanoir_dicomweb_proxy import DicomWebProxy, Principal, Settings, Upstream
from shanoir_dicomweb_proxy._access import Action, Visible
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._backends import StaticIdentifierMap
from shanoir_dicomweb_proxy._errors import ConfigError
from shanoir_dicomweb_proxy._signed_links import LinkKeys
from shanoir_dicomweb_proxy._store import ImportRow

from .support.asgi import Answer, call
from .support.keys import link_key_file, oct_key, rsa_key_file

STUDY_ROOT, SERIES_ROOT = "1.4.1", "1.4.2"
MAX_TTL = 600
#: Examination → its acquisitions; exam N is real study 2.25.N, acquisition A real 2.25.N.A.
EXAMS = {1: (11, 12), 2: (21,), 3: (31,)}
GRANTS: dict[tuple[str, Action], set[int]] = {
    ("alice", "read"): {1, 2},
    ("alice", "download"): {2},
    ("bob", "read"): {3},
}
NOT_FOUND = {"status": 404, "code": "not_found", "detail": "no such study"}


def _study(exam: int) -> str:
    return f"{STUDY_ROOT}.{exam}"


def _series(acquisition: int) -> str:
    return f"{SERIES_ROOT}.{acquisition}"


def _real(acquisition: int) -> str:
    return f"2.25.{acquisition // 10}.{acquisition}"


class _Pacs:
    """Answers every search and metadata request with the rows of the real UIDs it is asked
    for (a study's series when none is named); records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        parts = request.url.path.split("/")[2:]  # after /dicom-web
        query = dict(parse_qsl(request.url.query.decode()))
        studies = [f"2.25.{e}" for e in EXAMS]
        if len(parts) > 1:
            studies = [parts[1]]
        elif "StudyInstanceUID" in query:
            studies = [s for s in studies if s in query["StudyInstanceUID"].split(",")]
        rows = []
        for study in studies:
            series = [_real(a) for a in EXAMS[int(study.rsplit(".", 1)[1])]]
            if len(parts) > 3:
                series = [parts[3]]
            elif "SeriesInstanceUID" in query:
                series = [s for s in series if s == query["SeriesInstanceUID"]]
            for uid in series if parts[-1] != "studies" else series[:1]:
                rows.append(
                    {
                        "0020000D": {"vr": "UI", "Value": [study]},
                        "0020000E": {"vr": "UI", "Value": [uid]},
                    }
                )
        body = orjson.dumps(rows)
        return httpx.Response(
            200, stream=httpx.ByteStream(body), headers={"content-type": "application/dicom+json"}
        )


class _Policy:
    async def visible(self, principal: Principal, action: Action) -> Visible:
        return frozenset(GRANTS.get((principal.subject, action), set()))

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        return frozenset(exam_ids) & await self.visible(principal, action)


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    jwks = tmp_path / "jwks.json"
    rsa_key_file(jwks)
    old = oct_key("old")
    data: dict[str, Any] = {
        "auth": {"enabled": True, "jwks_file": str(jwks), "audience": ["dicomweb-proxy"]},
        "mapping": {
            "backend": "static",
            "study_root": STUDY_ROOT,
            "series_root": SERIES_ROOT,
            "file": "x",
        },
        "access": {"backend": "static", "file": "x", "retrieve_action": "download"},
        "links": {
            "enabled": True,
            "max_ttl": MAX_TTL,
            "keys_file": str(link_key_file(tmp_path / "links.json", old)),
        },
        "upstream": {"url": "http://pacs.invalid/dicom-web"},
        "logging": {"audit_log": str(tmp_path / "audit.jsonl")},
    }
    settings = Settings.from_dict(data)
    pacs = _Pacs()
    rows = [
        ImportRow(exam, f"2.25.{exam}", acquisition, _real(acquisition))
        for exam, acquisitions in EXAMS.items()
        for acquisition in acquisitions
    ]
    app = DicomWebProxy(
        settings,
        upstream=Upstream(settings.upstream, transport=httpx.MockTransport(pacs)),
        identifiers=StaticIdentifierMap(rows),
        access=_Policy(),
    )
    return {"app": app, "pacs": pacs, "settings": settings, "old": old, "tmp": tmp_path}


async def _make(site: dict[str, Any], user: str, **body: Any) -> Answer:
    token = dev_token(site["settings"], user, {"userId": user}, ttl=600)
    headers = [
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
    ]
    return await call(
        site["app"], "POST", b"/dicomweb/links", headers=headers, body=json.dumps(body).encode()
    )


async def _link(site: dict[str, Any], user: str, **body: Any) -> str:
    """The path of a new link (``/dicomweb/links/{token}``)."""
    made = await _make(site, user, **body)
    assert made.status == 201, made.body
    # The link's URL is the credential: no cache may keep it.
    assert made.headers[b"content-type"] == b"application/json"
    assert made.headers[b"cache-control"] == b"no-store"
    url: str = orjson.loads(made.body)["url"]
    assert url.startswith("http://proxy.test:8080/dicomweb/links/")
    return url.removeprefix("http://proxy.test:8080")


async def _get(
    site: dict[str, Any], path: str, accept: str = "application/dicom+json", **headers: str
) -> Answer:
    raw = [(b"accept", accept.encode()), *((k.encode(), v.encode()) for k, v in headers.items())]
    target, _, query = path.partition("?")
    return await call(site["app"], "GET", target.encode(), query.encode(), headers=raw)


def _shown(answer: Answer, tag: str = "0020000D") -> list[str]:
    assert answer.status == 200, answer.body
    return [row[tag]["Value"][0] for row in orjson.loads(answer.body)]


async def test_a_link_reads_its_examination_only(site: dict[str, Any]) -> None:
    async with site["app"]:  # the audit log is written by a thread it starts
        made = await _make(site, "alice", study=_study(1), ttl=120)
        assert made.status == 201
        expires = orjson.loads(made.body)["expires"]
        assert 119 <= expires - time.time() <= 121
        link = orjson.loads(made.body)["url"].removeprefix("http://proxy.test:8080")
        assert _shown(await _get(site, f"{link}/studies/{_study(1)}/metadata")) == [_study(1)] * 2
        # Any read method, any representation the client asks for.
        head = await call(site["app"], "HEAD", f"{link}/studies/{_study(1)}/metadata".encode())
        assert (head.status, head.body) == (200, b"")
        await _get(site, f"{link}/studies/{_study(1)}/metadata", "application/dicom+xml")
        assert site["pacs"].requests[-1].headers["accept"] == "application/dicom+xml"
        assert _shown(await _get(site, f"{link}/studies")) == [_study(1)]
        asked = len(site["pacs"].requests)
        # Another examination, even one alice may read, is no study for the link.
        for path in (f"/studies/{_study(2)}/metadata", f"/studies/{_study(3)}/series"):
            answer = await _get(site, link + path)
            assert (answer.status, orjson.loads(answer.body)) == (404, NOT_FOUND), path
        assert len(site["pacs"].requests) == asked
        # A read link does not retrieve (retrieve_action = "download").
        answer = await _get(
            site, f"{link}/studies/{_study(1)}", 'multipart/related; type="application/dicom"'
        )
        assert (answer.status, orjson.loads(answer.body)) == (404, NOT_FOUND)
        assert len(site["pacs"].requests) == asked
        # Whoever uses it, with whatever token: the link's grant only.
        bob = dev_token(site["settings"], "bob", {"userId": "bob"}, ttl=600)
        answer = await _get(
            site, f"{link}/studies/{_study(3)}/metadata", authorization=f"Bearer {bob}"
        )
        assert answer.status == 404
    audit = orjson.loads((site["tmp"] / "audit.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in audit.items() if k != "time"} == {
        "event": "link",
        "subject": "alice",
        "user_id": "alice",
        "examinations": [1],
        "series": None,
        "action": "read",
        "expires": expires,
    }


async def test_a_download_link_retrieves(site: dict[str, Any]) -> None:
    assert (await _make(site, "alice", study=_study(1), action="download")).status == 404
    link = await _link(site, "alice", study=_study(2), action="download")
    await _get(site, f"{link}/studies/{_study(2)}", 'multipart/related; type="application/dicom"')
    assert site["pacs"].requests[-1].url.path == "/dicom-web/studies/2.25.2"
    assert _shown(await _get(site, f"{link}/studies/{_study(2)}/metadata")) == [_study(2)]


async def test_a_link_to_one_acquisition_shows_only_it(site: dict[str, Any]) -> None:
    link = await _link(site, "alice", study=_study(1), series=_series(11))
    series = await _get(site, f"{link}/studies/{_study(1)}/series")
    assert _shown(series, "0020000E") == [_series(11)]
    assert dict(parse_qsl(site["pacs"].requests[-1].url.query.decode())) == {
        "SeriesInstanceUID": _real(11)
    }
    assert _shown(await _get(site, f"{link}/studies/{_study(1)}/series/{_series(11)}/metadata"))
    asked = len(site["pacs"].requests)
    for path in (
        f"/studies/{_study(1)}/series/{_series(12)}/metadata",
        f"/studies/{_study(1)}/metadata",
        f"/studies/{_study(1)}/series/{_series(12)}/instances",
    ):
        answer = await _get(site, link + path)
        assert (answer.status, orjson.loads(answer.body)) == (404, NOT_FOUND), path
    assert len(site["pacs"].requests) == asked
    # Instances of the study: those of the acquisition only.
    instances = await _get(site, f"{link}/studies/{_study(1)}/instances")
    assert _shown(instances, "0020000E") == [_series(11)]
    assert dict(parse_qsl(site["pacs"].requests[-1].url.query.decode())) == {
        "SeriesInstanceUID": _real(11)
    }
    # At the root, its study's own search row.
    assert _shown(await _get(site, f"{link}/studies")) == [_study(1)]


async def test_links_are_made_only_for_what_the_caller_may_do(site: dict[str, Any]) -> None:
    for user, body, detail in [
        ("alice", {"study": _study(3)}, "no such study"),
        ("alice", {"study": f"{STUDY_ROOT}.99"}, "no such study"),
        ("alice", {"study": "2.25.1"}, "no such study"),  # a real UID
        ("alice", {"study": _study(1), "action": "download"}, "no such study"),
        ("alice", {"study": _study(1), "series": _series(21)}, "no such series"),
        ("alice", {"study": _study(1), "series": _series(99)}, "no such series"),
        ("alice", {"study": _study(1), "series": "2.25.1.11"}, "no such series"),
    ]:
        answer = await _make(site, user, **body)
        assert (answer.status, orjson.loads(answer.body)["detail"]) == (404, detail), body
    assert (await _make(site, "bob", study=_study(3))).status == 201
    capped = await _make(site, "alice", study=_study(1), ttl=10 * MAX_TTL)
    assert orjson.loads(capped.body)["expires"] - time.time() <= MAX_TTL + 1
    default = await _make(site, "alice", study=_study(1))
    assert orjson.loads(default.body)["expires"] - time.time() >= MAX_TTL - 1
    shortest = await _make(site, "alice", study=_study(1), ttl=1)
    assert shortest.status == 201
    for body, detail in [
        ({}, "study (and series) must be public UIDs"),
        ({"study": 5}, "study (and series) must be public UIDs"),
        ({"study": _study(1), "series": 5}, "study (and series) must be public UIDs"),
        ({"study": _study(1), "action": "write"}, 'action must be "read" or "download"'),
        ({"study": _study(1), "ttl": -1}, "ttl must be a positive number of seconds"),
        ({"study": _study(1), "ttl": 0}, "ttl must be a positive number of seconds"),
        ({"study": _study(1), "ttl": True}, "ttl must be a positive number of seconds"),
        ({"study": _study(1), "ttl": "9"}, "ttl must be a positive number of seconds"),
        ({"study": _study(1), "x": 1}, "unknown key 'x'"),
    ]:
        answer = await _make(site, "alice", **body)
        assert (answer.status, orjson.loads(answer.body)["detail"]) == (400, detail), body
    anonymous = await call(site["app"], "POST", b"/dicomweb/links", body=b"{}")
    assert anonymous.status == 401
    wrong = await _get(site, "/dicomweb/links")
    assert wrong.status == 401  # no token: refused before anything else
    token = dev_token(site["settings"], "alice", {"userId": "alice"}, ttl=600)
    bearer = (b"authorization", f"Bearer {token}".encode())
    wrong = await _get(site, "/dicomweb/links", authorization=f"Bearer {token}")
    assert (wrong.status, wrong.headers[b"allow"]) == (405, b"POST")
    assert orjson.loads(wrong.body)["detail"] == "links are made with POST"
    for headers, body, detail in [
        ([bearer], b"{}", "POST /links takes application/json"),
        ([bearer, (b"content-type", b"text/plain")], b"{}", "POST /links takes application/json"),
        ([bearer, (b"content-type", b"application/json")], b"{", "the request body is not JSON"),
        (
            [bearer, (b"content-type", b"application/json")],
            b"[]",
            'expected {"study": ..., "series": ..., "action": ..., "ttl": ...}',
        ),
        (
            [bearer, (b"content-type", b"application/json")],
            b" " * 4097,
            "the request body exceeds 4096 bytes",
        ),
    ]:
        answer = await call(site["app"], "POST", b"/dicomweb/links", headers=headers, body=body)
        assert (answer.status, orjson.loads(answer.body)["detail"]) == (400, detail), body[:10]


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_forged_expired_and_withdrawn_links_are_refused(site: dict[str, Any]) -> None:
    link = await _link(site, "alice", study=_study(1))
    token = link.rsplit("/", 1)[1]
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    assert claims["exam"] == 1 and claims["act"] == "read" and claims["iss"] == "alice"
    keys = LinkKeys.load(str(link_key_file(site["tmp"] / "same.json", site["old"])))
    stranger = LinkKeys.load(str(link_key_file(site["tmp"] / "other.json", oct_key("old"))))
    invalid = "this link is not valid (or its key was withdrawn)"
    future = int(time.time()) + 60
    for forged, detail in [
        (f"{head}.{_b64({**claims, 'exam': 3})}.{signature}", invalid),
        ("x.y.z", invalid),
        (stranger.sign(claims), invalid),
        (keys.sign({**claims, "exp": int(time.time()) - 1}), "this link has expired"),
        (keys.sign({**claims, "act": "write"}), invalid),
        (keys.sign({**claims, "exam": "1"}), invalid),
        (keys.sign({**claims, "series": 11}), invalid),
        (keys.sign({**claims, "exp": float(future)}), invalid),
        (keys.sign({k: v for k, v in claims.items() if k != "iss"}), invalid),
        (
            jws.serialize_compact(
                {"alg": "HS256", "kid": "old"}, b"[1]", OctKey.import_key(site["old"])
            ),
            invalid,
        ),
    ]:
        answer = await _get(site, f"/dicomweb/links/{forged}/studies/{_study(1)}/series")
        assert answer.status == 401, forged
        assert orjson.loads(answer.body) == {
            "status": 401,
            "code": "invalid_link",
            "detail": detail,
        }
    # The same claims signed by a current key are a link.
    assert (await _get(site, f"/dicomweb/links/{keys.sign(claims)}/studies")).status == 200
    # Only reads; and a token with nothing after it is no route.
    answer = await call(site["app"], "POST", f"{link}/studies/{_study(1)}".encode())
    assert (answer.status, answer.headers[b"allow"]) == (405, b"GET, HEAD, OPTIONS")
    assert orjson.loads(answer.body)["detail"] == "a link only reads"
    answer = await _get(site, link)
    assert (answer.status, orjson.loads(answer.body)["detail"]) == (404, "not a DICOMweb resource")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read a JSON Web Key Set (FileNotFoundError)"),
        ("{", "cannot read a JSON Web Key Set (JSONDecodeError)"),
        ('{"keys": []}', 'expected {"keys": [...]} with at least one key'),
        ("[]", 'expected {"keys": [...]} with at least one key'),
        (
            '{"keys": [{"kty": "RSA", "kid": "a", "k": "SECRET"}]}',
            'key 1 is not an "oct" key with a "kid"',
        ),
        ('{"keys": [{"kty": "oct", "k": "SECRET"}]}', 'key 1 is not an "oct" key with a "kid"'),
        ('{"keys": [{"kty": "oct", "kid": "a", "k": 5}]}', "key 1 cannot be read"),
        (
            '{"keys": [{"kty": "oct", "kid": "a", "k": "U0VDUkVUU0VDUkVUU0VDUkVU"}]}',
            "key 1 is shorter than 32 bytes",
        ),
    ],
)
def test_a_bad_keys_file_is_named_never_shown(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "links.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        LinkKeys.load(str(path))
    assert str(refused.value) == f"[links] keys_file: {path}: {says}"
    assert "SECRET" not in str(refused.value) and "U0VDUkVU" not in str(refused.value)
