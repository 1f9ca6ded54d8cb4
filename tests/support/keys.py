"""Keys the tests sign with: an RSA key set for bearer tokens (``[auth] jwks_file``) and
symmetric keys for signed links (``[links] keys_file``)."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

from joserfc.jwk import KeySet, RSAKey


def rsa_key_file(path: Path, kid: str = "k") -> KeySet:
    """A fresh RSA key set written to ``path`` (private parts included, as dev-token reads)."""
    keys = KeySet([RSAKey.generate_key(2048, parameters={"kid": kid}, private=True)])
    path.write_text(json.dumps(keys.as_dict(private=True)))
    return keys


def oct_key(kid: str) -> dict[str, str]:
    """A fresh 32-byte ``oct`` JWK, as ``[links] keys_file`` holds them."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return {"kty": "oct", "kid": kid, "k": raw}


def link_key_file(path: Path, *keys: dict[str, str]) -> Path:
    """``keys`` (newest first) written to ``path`` as a key set; one fresh key by default."""
    path.write_text(json.dumps({"keys": list(keys) or [oct_key("k1")]}))
    return path
