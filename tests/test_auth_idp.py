"""Authentication against a real OpenID provider (panva's oidc-provider, Keycloak-shaped),
with the proxy as a real server in front of the real Orthanc."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jws

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer

from .support.faults import FaultServer
from .support.idp import PROXY_CLIENT_ID, PROXY_CLIENT_SECRET, IdentityProvider
from .support.settings import ProxyFactory


def _auth(idp: IdentityProvider, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "issuer": idp.issuer,
        "audience": ["dicomweb-proxy"],
        "jwks_min_refetch": 0.5,
        **extra,
    }


def _search(proxy: ProxyServer, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(proxy.dicomweb_url + "/studies", params={"limit": "1"}, headers=headers)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(tmp_path_factory.mktemp("idp")) as provider:
        yield provider


@pytest.fixture(scope="module")
def secured(
    idp: IdentityProvider, orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> ProxyServer:
    return proxy_factory(
        orthanc.dicomweb_url,
        auth=_auth(idp),
        cors={"allow_origins": ["https://viewer.example.org"]},
    )


def test_user_token_from_the_provider(idp: IdentityProvider, secured: ProxyServer) -> None:
    token = idp.password_token("alice")
    assert jws.extract_compact(token.encode()).headers()["typ"] == "at+jwt"
    response = _search(secured, token)
    assert response.status_code == 200 and len(response.json()) == 1


def test_service_account_token(idp: IdentityProvider, secured: ProxyServer) -> None:
    assert _search(secured, idp.client_credentials_token()).status_code == 200


def test_no_token_and_bad_token(secured: ProxyServer) -> None:
    missing = _search(secured, None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="dicomweb"'
    assert missing.headers["content-type"] == "application/problem+json"
    forged = _search(secured, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    assert forged.status_code == 401
    assert 'error="invalid_token"' in forged.headers["www-authenticate"]


def test_keycloak_typ_jwt_tokens(
    tmp_path: Path, orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    with IdentityProvider(tmp_path, typ="JWT") as keycloak_like:
        proxy = proxy_factory(orthanc.dicomweb_url, auth=_auth(keycloak_like))
        assert _search(proxy, keycloak_like.password_token("bob")).status_code == 200


def test_cors_preflight_needs_no_token(secured: ProxyServer) -> None:
    preflight = httpx.options(
        secured.dicomweb_url + "/studies",
        headers={
            "origin": "https://viewer.example.org",
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization, accept",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://viewer.example.org"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = httpx.options(
        secured.dicomweb_url + "/studies",
        headers={"origin": "https://evil.example", "access-control-request-method": "GET"},
    )
    assert "access-control-allow-origin" not in other.headers
    # A browser can read the 401 too, so the viewer can tell the user to log in.
    refused = httpx.get(
        secured.dicomweb_url + "/studies", headers={"origin": "https://viewer.example.org"}
    )
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://viewer.example.org"


def test_key_rotation(tmp_path: Path, orthanc: OrthancServer, proxy_factory: ProxyFactory) -> None:
    # Long enough for a loaded machine to get through the rotation before the old one expires.
    with IdentityProvider(tmp_path, ttl=15) as provider:
        proxy = proxy_factory(orthanc.dicomweb_url, auth=_auth(provider, leeway=0))
        old = provider.password_token("alice")
        expires = json.loads(jws.extract_compact(old.encode()).payload)["exp"]
        assert _search(proxy, old).status_code == 200
        provider.rotate_keys(keep_old=True)
        new = provider.password_token("alice")
        assert jws.extract_compact(new.encode()).headers()["kid"] == provider.kids[0]
        time.sleep(0.6)  # past jwks_min_refetch: the unknown kid triggers a refetch
        assert _search(proxy, new).status_code == 200
        assert _search(proxy, old).status_code == 200  # still valid until it expires
        time.sleep(max(0.0, expires + 1 - time.time()))
        assert _search(proxy, old).status_code == 401


def test_issuer_down_at_start_then_back(
    tmp_path: Path, orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    provider = IdentityProvider(tmp_path)
    provider.start()
    token = provider.password_token("alice")
    provider.stop()
    proxy = proxy_factory(orthanc.dicomweb_url, auth=_auth(provider))
    response = _search(proxy, token)
    assert response.status_code == 503
    assert response.json()["code"] == "auth_unavailable"
    provider.start()
    try:
        time.sleep(0.6)
        assert _search(proxy, token).status_code == 200
    finally:
        provider.stop()


def test_issuer_down_during_operation_keeps_known_keys(
    tmp_path: Path, orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    provider = IdentityProvider(tmp_path)
    provider.start()
    proxy = proxy_factory(orthanc.dicomweb_url, auth=_auth(provider))
    first, second = provider.password_token("alice"), provider.password_token("bob")
    assert _search(proxy, first).status_code == 200
    provider.stop()
    assert _search(proxy, second).status_code == 200  # never seen, checked with cached keys


def test_opaque_tokens_by_introspection(
    tmp_path: Path, orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    with IdentityProvider(tmp_path, opaque=True) as provider:
        introspection = {
            "url": provider.introspection_url,
            "client_id": PROXY_CLIENT_ID,
            "client_secret": PROXY_CLIENT_SECRET,
        }
        proxy = proxy_factory(
            orthanc.dicomweb_url, auth=_auth(provider, introspection=introspection)
        )
        token = provider.password_token("alice")
        assert token.count(".") == 0
        assert _search(proxy, token).status_code == 200
        assert _search(proxy, "not-a-token-the-provider-issued").status_code == 401
        provider.stop()
        # A token the proxy has not seen cannot be checked now: 503, never a pass.
        assert _search(proxy, "another-unknown-token").status_code == 503
        assert _search(proxy, token).status_code == 200  # cached answer, within its TTL


def test_upstream_client_credentials(idp: IdentityProvider, proxy_factory: ProxyFactory) -> None:
    fault = FaultServer(mode="json").start()
    try:
        proxy = proxy_factory(
            fault.url,
            auth=_auth(idp),
            upstream={
                "auth": {
                    "type": "client_credentials",
                    "token_url": idp.token_url,
                    "client_id": PROXY_CLIENT_ID,
                    "client_secret": PROXY_CLIENT_SECRET,
                }
            },
        )
        user_token = idp.password_token("alice")
        assert _search(proxy, user_token).status_code == 200
        sent = fault.last_request.decode("latin-1")
        bearer = next(
            line.split(" ", 2)[2]
            for line in sent.split("\r\n")
            if line.lower().startswith("authorization:")
        )
        assert bearer != user_token
        claims = jws.extract_compact(bearer.encode()).payload
        assert b'"azp":"dicomweb-proxy"' in claims
        # One token serves many requests.
        assert _search(proxy, user_token).status_code == 200
        assert bearer in fault.last_request.decode("latin-1")
    finally:
        fault.stop()
