"""The probes ``/readyz`` and ``check`` share: the upstream, the issuer, the store, Shanoir-NG,
the platforms of the ``http`` backends;
and the one ``check`` and ``serve`` run before anything listens: whether the address is free.

Each probe returns a :class:`ProbeResult` and never raises: a failure is a result that says
what failed, in words fit for an unauthenticated answer (no response body, no UID, no secret).
:class:`Probes` runs them together for one app; its readiness answer is reused for a second, so
that a flood of probes does not become a flood of upstream requests.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._auth import TokenValidator
from ._backends import PlatformClient, ShanoirDirectory
from ._errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from ._store import SqliteStore, StoreError
from ._upstream import Upstream

__all__ = [
    "ProbeResult",
    "Probes",
    "listen_failure",
    "probe_issuer",
    "probe_listen",
    "probe_platform",
    "probe_shanoir",
    "probe_store",
    "probe_upstream",
]

logger = logging.getLogger("shanoir_dicomweb_proxy.probes")

_QIDO = "/studies?limit=1"
# A successful introspection probe is reused this long: it costs the identity provider a
# request, unlike the key check, which answers from the keys already fetched.
_INTROSPECTION_REUSE = 30.0
# A probe token no identity provider has issued: the endpoint answers {"active": false}.
_PROBE_TOKEN = "shanoir-dicomweb-proxy-readiness-probe"
# Key fetches that outlive a probe's timeout: kept referenced until they end.
_background: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One check: its ``name``, whether it passed, a short ``detail``, its ``duration`` (s)."""

    name: str
    ok: bool
    detail: str
    duration: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "duration_ms": round(self.duration * 1000)}


async def probe_upstream(upstream: Upstream, *, within: float) -> ProbeResult:
    """One QIDO ``GET /studies?limit=1`` through ``upstream`` (its credentials), given
    ``within`` seconds; passes on 200 or 204. The body is never read."""
    started = time.monotonic()

    def result(ok: bool, detail: str) -> ProbeResult:
        return ProbeResult("upstream", ok, detail, time.monotonic() - started)

    try:
        async with asyncio.timeout(within):
            response = await upstream.send(
                "GET", _QIDO, headers=[(b"accept", b"application/dicom+json")]
            )
    except TimeoutError:
        return result(False, f"no answer within {within:g} s")
    except ProxyError as exc:
        return result(False, _upstream_failure(exc, upstream))
    await response.aclose()
    status = response.status_code
    if status in (200, 204):
        return result(True, f"QIDO answered {status}")
    if status in (401, 403):
        return result(False, f"QIDO answered {status}: check [upstream.auth]")
    if status == 404:
        return result(False, "QIDO answered 404: check [upstream] url (the DICOMweb root)")
    return result(False, f"QIDO answered {status}")


def _upstream_failure(exc: ProxyError, upstream: Upstream) -> str:
    if isinstance(exc, UpstreamUnavailable):
        return "unreachable"
    if isinstance(exc, UpstreamTimeout):
        return "no answer in time"
    if upstream.settings.auth.type == "client_credentials" and "token" in exc.detail:
        return f"{exc.detail}: check [upstream.auth]"
    return exc.detail


async def probe_issuer(
    validator: TokenValidator, *, within: float, fresh: bool = False
) -> ProbeResult:
    """Whether tokens can be checked: the issuer's keys are known (discovery and JWKS, or
    ``jwks_file``), or, with introspection only, its endpoint answers.

    The keys are fetched only when none are known or they are due for a refresh (at most every
    ``jwks_min_refetch`` seconds), or when ``fresh`` (a one-shot check, which gives up on the
    fetch after ``within`` seconds; a server lets it finish in the background). Known keys
    that could not be refreshed still pass: tokens signed with them are still checked.
    """
    started = time.monotonic()
    keys = validator.keys

    def result(ok: bool, detail: str) -> ProbeResult:
        return ProbeResult("issuer", ok, detail, time.monotonic() - started)

    if keys.jwks_file:
        return result(keys.known > 0, f"{keys.known} keys from [auth] jwks_file")
    if not (keys.issuer or keys.jwks_url):
        return await _probe_introspection(validator, within=within, started=started)
    if fresh or keys.known == 0 or keys.stale:
        # Shielded in a server: a fetch that outlives the probe still delivers its keys.
        fetch: Awaitable[None] = keys.refresh()
        if not fresh:
            task = asyncio.ensure_future(fetch)
            _background.add(task)
            task.add_done_callback(_forget)
            fetch = asyncio.shield(task)
        try:
            async with asyncio.timeout(within):
                await fetch
        except TimeoutError:
            if keys.known == 0:
                return result(False, f"no keys: no answer within {within:g} s")
    if keys.known == 0:
        return result(False, f"no keys: {keys.last_error or 'cannot be reached'}")
    detail = f"{keys.known} keys, fetched {keys.age:.0f} s ago"
    if keys.last_error:
        detail += f"; the last refresh failed: {keys.last_error}"
    return result(True, detail)


def _forget(task: asyncio.Task[None]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("fetching the issuer's keys failed: %r", task.exception())


async def _probe_introspection(
    validator: TokenValidator, *, within: float, started: float
) -> ProbeResult:
    settings = validator.settings.introspection
    assert settings is not None  # the settings require a way to check tokens

    def result(ok: bool, detail: str) -> ProbeResult:
        return ProbeResult("issuer", ok, detail, time.monotonic() - started)

    try:
        async with asyncio.timeout(within):
            response = await validator.keys.client.post(
                settings.url,
                data={"token": _PROBE_TOKEN, "token_type_hint": "access_token"},
                auth=(settings.client_id, settings.client_secret),
                headers={"accept": "application/json"},
            )
    except TimeoutError:
        return result(False, f"introspection: no answer within {within:g} s")
    except httpx.HTTPError:
        return result(False, "introspection: cannot be reached")
    status = response.status_code
    if status == 200:
        return result(True, "introspection answered 200")
    if status in (400, 401, 403):
        hint = "check [auth.introspection] client_id and client_secret"
        return result(False, f"introspection answered {status}: {hint}")
    return result(False, f"introspection answered {status}")


#: What Shanoir-NG serves without a token: the live OpenAPI documents of its two services.
_SHANOIR_DOCS = ("/studies/api-docs", "/datasets/api-docs")


#: Examinations without a StudyInstanceUID named by the Shanoir probe, at most.
_LEGACY_NAMED = 20


async def probe_shanoir(directory: ShanoirDirectory, *, within: float) -> ProbeResult:
    """Shanoir-NG's studies and datasets services answer (their OpenAPI documents, no token);
    with ``credentials = "service"``, the proxy's own client also reads the rights matrix."""
    started = time.monotonic()

    def result(ok: bool, detail: str) -> ProbeResult:
        return ProbeResult("shanoir", ok, detail, time.monotonic() - started)

    api = directory.api
    try:
        async with asyncio.timeout(within):
            for path in _SHANOIR_DOCS:
                status = await api.status(path)
                if status != 200:
                    return result(False, f"GET {path} answered {status}")
            if directory.credentials == "service":
                view = await directory.view(None)
    except TimeoutError:
        return result(False, f"no answer within {within:g} s")
    except httpx.HTTPError:
        return result(False, "unreachable: check [shanoir] url")
    except ProxyError:
        return result(False, "the service client cannot read the rights: check [shanoir.service]")
    if directory.credentials == "service":
        detail = f"answers; {len(view.exams)} examinations, {len(view.members)} rights"
        legacy = sorted(e for e, exam in view.exams.items() if exam.study_uid is None)
        if legacy:
            # No Shanoir API tells these exams' studies (its wrapper reads them from dataset
            # file URLs): the operator sets examination.study_instance_uid, so name them.
            named = ", ".join(map(str, legacy[:_LEGACY_NAMED]))
            if len(legacy) > _LEGACY_NAMED:
                named += f" and {len(legacy) - _LEGACY_NAMED} more"
            detail += f"; {len(legacy)} without a StudyInstanceUID, not shown: {named}"
        return result(True, detail)
    return result(True, "answers")


async def probe_platform(name: str, client: PlatformClient, *, within: float) -> ProbeResult:
    """One request of the ``http`` contract to the platform of ``[mapping]`` or ``[access]``
    (``name``), given ``within`` seconds: it must answer as the contract says."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            problem = await client.probe()
    except TimeoutError:
        problem = f"no answer within {within:g} s"
    return ProbeResult(name, problem is None, problem or "answers", time.monotonic() - started)


async def probe_store(store: SqliteStore, *, within: float) -> ProbeResult:
    """One trivial query on the embedded store, in a worker thread, given ``within`` seconds."""
    started = time.monotonic()

    def result(ok: bool, detail: str) -> ProbeResult:
        return ProbeResult("store", ok, detail, time.monotonic() - started)

    try:
        async with asyncio.timeout(within):
            filled = await asyncio.to_thread(store.has_examinations)
    except TimeoutError:
        return result(False, f"no answer within {within:g} s")
    except StoreError as exc:
        return result(False, str(exc).removeprefix(f"{store.path}: "))
    if not filled:
        return result(True, "answers; empty: `store sync` or `store import` fills it")
    return result(True, "answers")


_LISTEN_FAILURES = {
    errno.EADDRINUSE: "already in use: another process listens there",
    errno.EACCES: "permission denied: a port below 1024 needs privileges (CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "not an address of this machine",
}


def probe_listen(host: str, port: int) -> ProbeResult:
    """Whether ``host:port`` can be listened on, bound as hypercorn binds (``SO_REUSEADDR``)
    and let go at once; the failure says why (in use, privileged port, not an address here)."""
    started = time.monotonic()

    def result(ok: bool, detail: str) -> ProbeResult:
        return ProbeResult("listen", ok, detail, time.monotonic() - started)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return result(False, listen_failure(exc, host))
    return result(True, "free")


def listen_failure(exc: OSError, host: str) -> str:
    """Why listening on ``host`` failed, in words (what :func:`probe_listen` says)."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r}"
    return _LISTEN_FAILURES.get(exc.errno or 0, exc.strerror or str(exc))


class Probes:
    """The probes of one app: its upstream, its validator (when auth is on), the embedded store
    its backends read, the Shanoir-NG or the ``platforms`` (by section) they ask; each bounded
    by ``timeout`` (``[server] ready_timeout``).
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        validator: TokenValidator | None,
        store: SqliteStore | None,
        timeout: float,
        platforms: Mapping[str, PlatformClient] | None = None,
        shanoir: ShanoirDirectory | None = None,
        reuse: float = 1.0,
    ) -> None:
        self.upstream = upstream
        self.shanoir = shanoir
        self.validator = validator
        self.timeout = timeout
        self.reuse = reuse
        self.store = store
        self.platforms = dict(platforms or {})
        self._last: tuple[float, list[ProbeResult]] | None = None
        self._introspection: tuple[float, ProbeResult] | None = None
        self._lock = asyncio.Lock()

    async def run(self, *, fresh: bool = False) -> list[ProbeResult]:
        """Every probe, now, concurrently; ``fresh`` fetches the issuer's keys again."""
        checks: list[tuple[str, Callable[[], Awaitable[ProbeResult]]]] = [
            ("upstream", functools.partial(probe_upstream, self.upstream, within=self.timeout))
        ]
        if self.validator is not None:
            checks.append(("issuer", functools.partial(self._issuer, self.validator, fresh=fresh)))
        if self.store is not None:
            checks.append(
                ("store", functools.partial(probe_store, self.store, within=self.timeout))
            )
        if self.shanoir is not None:
            checks.append(
                ("shanoir", functools.partial(probe_shanoir, self.shanoir, within=self.timeout))
            )
        for name, client in self.platforms.items():
            checks.append(
                (name, functools.partial(probe_platform, name, client, within=self.timeout))
            )
        return list(await asyncio.gather(*(_guarded(name, probe) for name, probe in checks)))

    async def readiness(self) -> list[ProbeResult]:
        """:meth:`run`, its answer reused for ``reuse`` seconds; concurrent callers share a run."""
        async with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self.reuse:
                return self._last[1]
            results = await self.run()
            self._last = (time.monotonic(), results)
            return results

    async def _issuer(self, validator: TokenValidator, *, fresh: bool) -> ProbeResult:
        keys = validator.keys
        if keys.jwks_file or keys.issuer or keys.jwks_url:
            return await probe_issuer(validator, within=self.timeout, fresh=fresh)
        cached = self._introspection
        if not fresh and cached is not None and time.monotonic() - cached[0] < _INTROSPECTION_REUSE:
            return cached[1]
        result = await probe_issuer(validator, within=self.timeout)
        self._introspection = (time.monotonic(), result) if result.ok else None
        return result


async def _guarded(name: str, probe: Callable[[], Awaitable[ProbeResult]]) -> ProbeResult:
    """``probe()``, with an unexpected error turned into a failed result."""
    started = time.monotonic()
    try:
        return await probe()
    except Exception as exc:
        logger.exception("the %s probe failed", name)
        return ProbeResult(name, False, f"error: {type(exc).__name__}", time.monotonic() - started)
