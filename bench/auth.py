"""The cost of authentication per request: a cached token check, and a first check.

    python bench/auth.py

Target: a cached JWT check under 50 µs per request on the project's 2-core machines.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy import AuthMiddleware, AuthSettings, TokenValidator

ROUNDS = 7
N = 20000


def _token(key: RSAKey) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://idp.test/realms/shanoir-ng",
        "sub": "f3a1-alice",
        "aud": ["dicomweb-proxy", "account"],
        "azp": "ohif",
        "exp": now + 3600,
        "iat": now,
        "userId": 7,
        "preferred_username": "alice",
        "realm_access": {"roles": ["ROLE_USER"]},
    }
    return jwt.encode({"alg": "RS256", "typ": "JWT", "kid": "k"}, claims, key)


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    return None


async def main() -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
    with tempfile.TemporaryDirectory() as tmp:
        jwks = Path(tmp) / "jwks.json"
        jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
        settings = AuthSettings(
            issuer="https://idp.test/realms/shanoir-ng",
            audience=("dicomweb-proxy",),
            jwks_file=str(jwks),
        )
        validator = TokenValidator(settings)
        token = _token(key)
        middleware = AuthMiddleware(_inner, validator=validator)
        scope = {
            "type": "http",
            "headers": [(b"host", b"proxy"), (b"authorization", f"Bearer {token}".encode())],
            "query_string": b"",
        }
        await middleware(dict(scope), None, None)  # the first check fills the cache

        async def per_request() -> float:
            start = time.perf_counter()
            for _ in range(N):
                await middleware(dict(scope), None, None)
            return (time.perf_counter() - start) / N * 1e6

        async def bare() -> float:
            start = time.perf_counter()
            for _ in range(N):
                await _inner(dict(scope), None, None)
            return (time.perf_counter() - start) / N * 1e6

        cached = statistics.median([await per_request() for _ in range(ROUNDS)])
        baseline = statistics.median([await bare() for _ in range(ROUNDS)])
        first = []
        for _ in range(200):
            fresh = _token(key)
            start = time.perf_counter()
            await validator.validate(fresh)
            first.append((time.perf_counter() - start) * 1e6)
            validator._cache.clear()  # tokens minted in the same second are identical
        full = statistics.median(first)
        added = cached - baseline
        verdict = "PASS" if added < 50 else "MISS"
        print(f"cached token, whole AuthMiddleware: {added:.1f} µs per request (< 50: {verdict})")
        print(f"first sight of a token (RS256 signature and claims): {full:.1f} µs")


if __name__ == "__main__":
    asyncio.run(main())
