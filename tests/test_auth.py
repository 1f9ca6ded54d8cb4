"""Token validation, attack by attack, against keys from a file (in-process stack).

The real identity provider is exercised in test_auth_idp.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from shanoir_dicomweb_proxy import Settings
from shanoir_dicomweb_proxy._auth import dev_token

from .support.asgi import Answer, build, call

ISSUER = "https://idp.test/realms/shanoir-ng"
AUDIENCE = "dicomweb-proxy"


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return KeySet(
        [
            RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True),
            ECKey.generate_key("P-256", parameters={"kid": "ec-1"}, private=True),
        ]
    )


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory, keys: KeySet) -> Path:
    path = tmp_path_factory.mktemp("keys") / "jwks.json"
    path.write_text(json.dumps(keys.as_dict(private=True)))
    return path


def _auth(jwks_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "issuer": ISSUER,
        "audience": [AUDIENCE],
        "jwks_file": str(jwks_file),
        **extra,
    }


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "f3a1-alice",
        "aud": [AUDIENCE, "account"],
        "azp": "ohif",
        "exp": now + 300,
        "iat": now,
        "userId": 7,
        "preferred_username": "alice",
        "realm_access": {"roles": ["ROLE_USER"]},
        "resource_access": {AUDIENCE: {"roles": ["uploader"]}},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(keys: KeySet, claims: dict[str, Any], **header: Any) -> str:
    head = {"alg": "RS256", "typ": "JWT", "kid": "rsa-1", **header}
    key = keys.get_by_kid(head["kid"]) if head.get("kid") else keys.keys[0]
    head = {k: v for k, v in head.items() if v is not None}
    return jwt.encode(head, claims, key, default_type=None)


class Upstream:
    """A recording stand-in for the PACS (the real one is in the end-to-end tests)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(
            200, stream=httpx.ByteStream(b"[]"), headers={"content-type": "application/dicom+json"}
        )


async def _get(app: Any, token: str | None = None, query: bytes = b"", **headers: str) -> Answer:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    if token is not None:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    return await call(app, "GET", b"/dicomweb/studies", query, headers=raw)


_NOT_VALID = "the access token is not valid"
_DETAILS = {
    "missing": "an access token is required",
    "expired": "the access token expired",
}


async def _refused(
    app: Any, answer: Answer, reason: str, *, error: str = "invalid_token", detail: str = ""
) -> None:
    """``answer`` is a 401 with its exact challenge and problem body, refused for ``reason``:
    the word the proxy counts in its metrics (``token_failures``), which tells an expired token
    from a forged one where the client is told only that the token is not valid."""
    detail = detail or _DETAILS.get(reason, _NOT_VALID)
    assert answer.status == 401
    challenge = answer.headers[b"www-authenticate"].decode()
    if reason == "missing":
        assert challenge == 'Bearer realm="dicomweb"'
        code = "missing_token"
    else:
        assert challenge == (
            f'Bearer realm="dicomweb", error="{error}", error_description="{detail}"'
        )
        code = "invalid_token"
    assert json.loads(answer.body) == {"status": 401, "code": code, "detail": detail}
    assert await _failures(app) == {reason: 1}


async def _failures(app: Any) -> dict[str, float]:
    """Refused tokens by reason, as ``/metrics`` shows them."""
    metrics = (await call(app, "GET", b"/metrics")).body.decode()
    found = re.findall(
        r'^dicomweb_proxy_token_failures_total\{reason="(\w+)"\} (\S+)$', metrics, re.M
    )
    return {reason: float(value) for reason, value in found}


async def test_valid_token_reaches_upstream_without_its_authorization(
    keys: KeySet, jwks_file: Path
) -> None:
    upstream = Upstream()
    app = build(upstream, auth=_auth(jwks_file))
    answer = await _get(app, _sign(keys, _claims()))
    assert answer.status == 200
    assert len(upstream.requests) == 1
    assert "authorization" not in upstream.requests[0].headers


async def test_ec_key_and_at_jwt_type(keys: KeySet, jwks_file: Path) -> None:
    app = build(Upstream(), auth=_auth(jwks_file))
    token = _sign(keys, _claims(), alg="ES256", kid="ec-1", typ="at+jwt")
    assert (await _get(app, token)).status == 200


async def test_missing_token(jwks_file: Path) -> None:
    upstream = Upstream()
    app = build(upstream, auth=_auth(jwks_file))
    await _refused(app, await _get(app), "missing")
    assert upstream.requests == []


async def test_not_a_bearer_scheme(jwks_file: Path) -> None:
    app = build(Upstream(), auth=_auth(jwks_file))
    answer = await _get(app, authorization="Basic YWxpY2U6cHc=")
    detail = "the Authorization header is not a bearer token"
    await _refused(app, answer, "malformed", error="invalid_request", detail=detail)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_alg_none(jwks_file: Path) -> None:
    token = _b64({"alg": "none", "typ": "JWT", "kid": "rsa-1"}) + "." + _b64(_claims()) + "."
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "algorithm")


async def test_hs256_signed_with_the_public_key(keys: KeySet, jwks_file: Path) -> None:
    # The classic confusion attack: the issuer's public key used as an HMAC secret.
    # joserfc itself refuses to sign that, so the token is built by hand.
    public_pem = keys.get_by_kid("rsa-1").as_pem(private=False)
    signing_input = _b64({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}) + "." + _b64(_claims())
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "algorithm")


async def test_key_never_published(jwks_file: Path) -> None:
    rogue = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
    token = jwt.encode({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}, _claims(), rogue)
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "bad_signature")


async def test_key_id_never_published(keys: KeySet, jwks_file: Path) -> None:
    rogue = RSAKey.generate_key(2048, parameters={"kid": "rsa-9"}, private=True)
    token = jwt.encode({"alg": "RS256", "typ": "JWT", "kid": "rsa-9"}, _claims(), rogue)
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "unknown_key")


async def test_signed_payload_that_is_no_claims(keys: KeySet, jwks_file: Path) -> None:
    head = {"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}
    token = jws.serialize_compact(head, b"not JSON", keys.get_by_kid("rsa-1"))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "malformed")


async def test_tampered_payload(keys: KeySet, jwks_file: Path) -> None:
    head, _, signature = _sign(keys, _claims()).split(".")
    forged = _b64(_claims(realm_access={"roles": ["ROLE_ADMIN"]}))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, f"{head}.{forged}.{signature}"), "bad_signature")


async def test_expired(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(exp=int(time.time()) - 120))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "expired")


async def test_expired_within_leeway_is_accepted(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(exp=int(time.time()) - 10))
    assert (await _get(build(Upstream(), auth=_auth(jwks_file)), token)).status == 200


async def test_not_yet_valid(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(nbf=int(time.time()) + 600))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "invalid_claims")


async def test_wrong_issuer(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(iss="https://idp.test/realms/other"))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "wrong_issuer")


async def test_wrong_audience(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(aud="account", azp=AUDIENCE))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "wrong_audience")


async def test_audience_may_match_azp_when_configured(keys: KeySet, jwks_file: Path) -> None:
    # Keycloak often issues aud "account" and names the client in azp.
    token = _sign(keys, _claims(aud="account", azp=AUDIENCE))
    app = build(Upstream(), auth=_auth(jwks_file, audience_matches_azp=True))
    assert (await _get(app, token)).status == 200


async def test_missing_kid_with_several_keys(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(), kid=None)
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "unknown_key")


@pytest.mark.parametrize("typ", ["ID", "Refresh", None])
async def test_wrong_token_type(keys: KeySet, jwks_file: Path, typ: str | None) -> None:
    # An ID or refresh token from the same issuer is not an access token.
    token = _sign(keys, _claims(), typ=typ)
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "token_type")


async def test_missing_subject(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(sub=None))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "invalid_claims")


async def test_missing_issuer(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(iss=None))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "wrong_issuer")


async def test_missing_kid_with_one_key(tmp_path: Path) -> None:
    # With a single key there is no doubt which one signed.
    one = KeySet([RSAKey.generate_key(2048, parameters={"kid": "only"}, private=True)])
    path = tmp_path / "one.json"
    path.write_text(json.dumps(one.as_dict(private=True)))
    token = jwt.encode({"alg": "RS256", "typ": "JWT"}, _claims(), one.keys[0])
    assert (await _get(build(Upstream(), auth=_auth(path)), token)).status == 200


async def test_three_parts_that_are_no_jws(jwks_file: Path) -> None:
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, "x.y.z"), "malformed")


async def test_missing_expiry(keys: KeySet, jwks_file: Path) -> None:
    # A token with no exp would be valid forever.
    token = _sign(keys, _claims(exp=None))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "invalid_claims")


async def test_opaque_token_without_introspection(jwks_file: Path) -> None:
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, "opaque-token-value"), "malformed")


async def test_principal(keys: KeySet, jwks_file: Path) -> None:
    app = build(Upstream(), auth=_auth(jwks_file, client_roles=True, user_claim="userId"))
    validator = app.validator
    assert validator is not None
    token = _sign(keys, _claims())
    principal = await validator.validate(token)
    assert principal.subject == "f3a1-alice"
    assert principal.user_id == "7"
    assert principal.username == "alice"
    assert principal.token_id == hashlib.sha256(token.encode()).hexdigest()[:16]
    assert principal.claims["azp"] == "ohif"
    # A user claim that is absent or not a scalar names no user (grants then go by subject).
    for claim in (None, {"id": 7}, [7]):
        other = await validator.validate(_sign(keys, _claims(userId=claim, preferred_username=5)))
        assert (other.user_id, other.username) == (None, None), claim
    assert principal.roles == {"ROLE_USER", "uploader"}
    assert not principal.is_admin
    admin = await validator.validate(_sign(keys, _claims(realm_access={"roles": ["ROLE_ADMIN"]})))
    assert admin.is_admin
    nested = build(Upstream(), auth=_auth(jwks_file, user_claim="attributes.shanoirId"))
    assert nested.validator is not None
    token = _sign(keys, _claims(attributes={"shanoirId": "42"}))
    assert (await nested.validator.validate(token)).user_id == "42"


async def test_cached_principal_expires_with_the_token(keys: KeySet, jwks_file: Path) -> None:
    app = build(Upstream(), auth=_auth(jwks_file, leeway=0))
    # exp is whole seconds: 2 s ahead is at least 1 s of validity, however slow the machine.
    exp = int(time.time()) + 2
    token = _sign(keys, _claims(exp=exp))
    assert (await _get(app, token)).status == 200
    await asyncio.sleep(exp - time.time() + 0.2)
    await _refused(app, await _get(app, token), "expired")


async def test_query_token_only_when_allowed(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims())
    query = f"PatientID=X*&access_token={token}".encode()
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, query=query), "missing")
    upstream = Upstream()
    app = build(upstream, auth=_auth(jwks_file, allow_query_token=True))
    assert (await _get(app, query=query)).status == 200
    # The token never travels upstream.
    assert str(upstream.requests[0].url).endswith("/studies?PatientID=X*")
    # Nor when it is not the token used: not allowed, or a header given as well.
    upstream = Upstream()
    app = build(upstream, auth=_auth(jwks_file))
    assert (await _get(app, token, query=query)).status == 200
    assert str(upstream.requests[0].url).endswith("/studies?PatientID=X*")


async def test_cookie_token_only_when_allowed(keys: KeySet, jwks_file: Path) -> None:
    cookie = f"other=1; access_token={_sign(keys, _claims())}"
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, cookie=cookie), "missing")
    upstream = Upstream()
    app = build(upstream, auth=_auth(jwks_file, allow_cookie_token=True))
    assert (await _get(app, cookie=cookie)).status == 200
    assert "cookie" not in upstream.requests[0].headers


async def test_dev_token_is_accepted(jwks_file: Path) -> None:
    settings = Settings.from_dict(
        {
            "upstream": {"url": "http://pacs.invalid/dicom-web"},
            "auth": _auth(jwks_file),
            "mapping": {"backend": "identity"},
            "access": {"backend": "allow_all"},
        }
    )
    token = dev_token(settings, "bob", {"userId": 2, "realm_access.roles": ["ROLE_USER"]}, ttl=60)
    app = build(Upstream(), auth=_auth(jwks_file))
    assert app.validator is not None
    principal = await app.validator.validate(token)
    assert (principal.subject, principal.user_id) == ("bob", "2")


async def test_issued_in_the_future(keys: KeySet, jwks_file: Path) -> None:
    token = _sign(keys, _claims(iat=int(time.time()) + 600))
    app = build(Upstream(), auth=_auth(jwks_file))
    await _refused(app, await _get(app, token), "invalid_claims")


@pytest.mark.parametrize("kind", ["ID", "Refresh", "Logout"])
async def test_keycloak_id_and_refresh_tokens(keys: KeySet, jwks_file: Path, kind: str) -> None:
    # Same key, same header type as an access token: only the payload's typ tells them apart.
    token = _sign(keys, _claims(typ=kind))
    app = build(Upstream(), auth=_auth(jwks_file, audience_matches_azp=True))
    await _refused(app, await _get(app, token), "token_type")
    assert (await _get(app, _sign(keys, _claims(typ="Bearer")))).status == 200


class _Introspection(ThreadingHTTPServer):
    """An RFC 7662 endpoint on the loopback interface that answers ``answer`` (with
    ``status``) to every token, and records each request: its form, and its headers."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _IntrospectionHandler)
        self.answer: Any = {}
        self.status = 200
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        threading.Thread(target=self.serve_forever, args=(0.01,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/introspect"


class _IntrospectionHandler(BaseHTTPRequestHandler):
    server: _Introspection

    def do_POST(self) -> None:
        form = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.requests.append((dict(parse_qsl(form)), headers))
        body = json.dumps(self.server.answer).encode()
        self.send_response(self.server.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def introspection() -> Iterator[_Introspection]:
    server = _Introspection()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        ({"exp": int(time.time()) - 600}, "expired"),
        ({"iss": "https://other.example.org/realms/x"}, "wrong_issuer"),
        ({"aud": ["account"]}, "wrong_audience"),
    ],
    ids=["expired", "wrong-issuer", "wrong-audience"],
)
async def test_introspected_claims_are_checked(
    jwks_file: Path,
    introspection: _Introspection,
    claim: dict[str, Any],
    reason: str,
) -> None:
    # The same answer but for one claim passes: each refusal is that claim's check.
    settings = {"url": introspection.url, "client_id": "proxy", "client_secret": "s"}
    app = build(Upstream(), auth=_auth(jwks_file, leeway=0, introspection=settings))
    introspection.answer = {"active": True, **_claims()}
    assert (await _get(app, "opaque-token-1")).status == 200
    introspection.answer = {"active": True, **_claims(**claim)}
    await _refused(app, await _get(app, "opaque-token-2"), reason)


def _introspecting(jwks_file: Path, introspection: _Introspection, **extra: Any) -> Any:
    settings = {"url": introspection.url, "client_id": "proxy", "client_secret": "s3cret"}
    return build(Upstream(), auth=_auth(jwks_file, introspection={**settings, **extra}))


async def test_introspection_is_asked_as_rfc_7662_says(
    jwks_file: Path, introspection: _Introspection
) -> None:
    """The form names the token and its type, the proxy authenticates as its own client, and
    an answer without ``iss`` (optional in RFC 7662) or within the leeway is accepted."""
    app = _introspecting(jwks_file, introspection)
    introspection.answer = {"active": True, **_claims(iss=None, exp=int(time.time()) - 10)}
    assert (await _get(app, "opaque-token-1")).status == 200
    ((form, headers),) = introspection.requests
    assert form == {"token": "opaque-token-1", "token_type_hint": "access_token"}
    assert headers["authorization"] == "Basic " + base64.b64encode(b"proxy:s3cret").decode()
    assert headers["accept"] == "application/json"


@pytest.mark.parametrize(
    "answer",
    [
        {"active": False, "sub": "alice", "aud": AUDIENCE},
        {"active": "true", "sub": "alice", "aud": AUDIENCE},
        {"active": True, "aud": AUDIENCE},
        [],
        {"sub": "alice", "aud": AUDIENCE},
    ],
    ids=["inactive", "active-not-a-boolean", "no-subject", "not-an-object", "no-active"],
)
async def test_inactive_introspected_tokens_are_refused_and_remembered(
    jwks_file: Path, introspection: _Introspection, answer: Any
) -> None:
    app = _introspecting(jwks_file, introspection)
    introspection.answer = answer
    await _refused(app, await _get(app, "opaque-token-1"), "inactive")
    # Refused again without asking the endpoint, even once it would say otherwise.
    introspection.answer = {"active": True, **_claims()}
    answer_again = await _get(app, "opaque-token-1")
    assert answer_again.status == 401 and len(introspection.requests) == 1
    assert (await _failures(app)) == {"inactive": 2}


async def test_introspection_down_is_503(jwks_file: Path, introspection: _Introspection) -> None:
    app = _introspecting(jwks_file, introspection)
    introspection.status = 500
    answer = await _get(app, "opaque-token-1")
    assert answer.status == 503
    assert json.loads(answer.body) == {
        "status": 503,
        "code": "auth_unavailable",
        "detail": "the identity provider cannot be reached to check tokens",
    }


@pytest.mark.parametrize("exp", [30, 3600, None], ids=["exp-first", "ttl-first", "no-exp"])
async def test_introspected_principals_live_until_exp_or_cache_ttl(
    jwks_file: Path, introspection: _Introspection, exp: int | None
) -> None:
    app = _introspecting(jwks_file, introspection, cache_ttl=120)
    validator = app.validator
    assert validator is not None
    now = time.time()
    expires = None if exp is None else int(now) + exp
    introspection.answer = {"active": True, **_claims(exp=expires)}
    principal = await validator.validate("opaque-token-1")
    expected = min(expires, now + 120) if expires is not None else now + 120
    assert principal.expires_at is not None
    assert abs(principal.expires_at - expected) < 2
    assert await validator.validate("opaque-token-1") is principal  # cached
    assert len(introspection.requests) == 1
