"""The ``http`` backends: a small REST contract a platform implements (``docs/backends.md``,
``docs/access.md``), over one failing-closed JSON client.

- :class:`HttpIdentifierMap`: ``POST {url}/studies/lookup`` and ``/series/lookup``.
- :class:`HttpAccessPolicy`: ``POST {url}/access/visible`` and ``/access/allowed``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import httpx

from .._access import ALL, Action, Visible
from .._errors import AccessUnavailable, MappingUnavailable, ProxyError
from .._identifiers import SeriesEntry, is_domain_id, is_uid
from .._scope import Principal

__all__ = ["HttpAccessPolicy", "HttpIdentifierMap", "PlatformClient"]

_K = TypeVar("_K")
_V = TypeVar("_V")

_mapping_logger = logging.getLogger("shanoir_dicomweb_proxy.mapping")
_access_logger = logging.getLogger("shanoir_dicomweb_proxy.access")

_BATCH = 1000  # keys per request at most
_TIMEOUT = httpx.Timeout(10.0, connect=5.0, pool=5.0)
_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=5.0)
_MAPPING_UNAVAILABLE = "the identifier mapping cannot be reached"
_ACCESS_UNAVAILABLE = "access decisions cannot be made now"


class Malformed(Exception):
    """The platform's answer breaks the contract; the message names where, never a value."""


class PlatformClient:
    """The client of a platform's JSON API (``POST {url}{path}``), failing closed.

    A platform that cannot be reached, times out, answers anything but 200, or answers what is
    not JSON or what the contract does not allow (:class:`Malformed`) raises
    :meth:`_unavailable` (a 503) and logs a warning naming the URL and why, never a value. One
    ``httpx.AsyncClient``, opened on first use, closed by :meth:`aclose`: no cookies, no
    redirects, no ``HTTP_PROXY``; ``Authorization: Bearer`` when a token is set. Requests carry
    at most ``batch_size`` keys.
    """

    _section: ClassVar[str]  # whose settings: "mapping" names "[mapping] token" in hints
    _logger: ClassVar[logging.Logger]

    def __init__(
        self,
        url: str,
        *,
        token: str = "",
        timeout: httpx.Timeout = _TIMEOUT,
        batch_size: int = _BATCH,
    ) -> None:
        if not 1 <= batch_size <= _BATCH:
            raise ValueError(f"batch_size must be between 1 and {_BATCH}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.batch_size = batch_size
        self._headers = {"accept": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _unavailable(self) -> ProxyError:
        raise NotImplementedError

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False, timeout=self.timeout, limits=_LIMITS, follow_redirects=False
            )
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client (a later call would open a new one)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def probe(self) -> str | None:
        """One request of the contract, about examination 1 and nobody's identity, for the
        readiness probe: None when the answer keeps the contract, else why not (no value)."""
        try:
            await self._probe()
        except _Failure as exc:
            return exc.reason
        return None

    async def _probe(self) -> None:
        raise NotImplementedError

    async def _post(self, path: str, body: Mapping[str, Any], parse: Callable[[Any], _V]) -> _V:
        """POST ``body`` as JSON; ``parse`` the decoded answer (raising :class:`Malformed`);
        a failure is logged and raised as :meth:`_unavailable`."""
        try:
            return await self._exchange(path, body, parse)
        except _Failure as exc:
            what = f"{self._section} platform: POST {self.url}{path}"
            self._logger.warning("%s: %s", what, exc.logged)
            raise self._unavailable() from None

    async def _exchange(self, path: str, body: Mapping[str, Any], parse: Callable[[Any], _V]) -> _V:
        """:meth:`_post` without the log: a failure raises :class:`_Failure`."""
        try:
            response = await self._http().post(self.url + path, json=body, headers=self._headers)
        except httpx.TimeoutException:
            raise _Failure("no answer in time") from None
        except httpx.HTTPError as exc:
            raise _Failure("unreachable", f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status != 200:
            hint = f" (check [{self._section}] token)" if status in (401, 403) else ""
            url_hint = f" (check [{self._section}] url)" if status == 404 else hint
            raise _Failure(f"POST {path} answered {status}{url_hint}", f"answered {status}{hint}")
        try:
            try:
                data = json.loads(response.content)
            except ValueError:
                raise Malformed("not JSON") from None
            return parse(data)
        except Malformed as exc:
            logged = f"malformed answer: {exc}"
            raise _Failure(f"POST {path}: {logged}", logged) from None


class _Failure(Exception):
    """Why a request to the platform failed: ``reason`` in words fit for an unauthenticated
    answer, ``logged`` with the library's own message."""

    def __init__(self, reason: str, logged: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.logged = logged or reason


#: The examination and identity the readiness probe asks about.
_PROBE_ID = 1
_PROBE_USER: dict[str, Any] = {
    "id": None,
    "subject": "shanoir-dicomweb-proxy-readiness-probe",
    "username": None,
    "roles": [],
}


class HttpIdentifierMap(PlatformClient):
    """The identifier map of a platform that implements the lookup contract of
    ``docs/backends.md``: ``POST {url}/studies/lookup`` and ``POST {url}/series/lookup``, one
    request per batch of at most 1000 keys.

    Fails closed: a platform that cannot be reached, times out, answers anything but 200 or
    answers something the contract does not allow raises :class:`MappingUnavailable` (503).
    Uses one ``httpx.AsyncClient``, opened on first use, closed by :meth:`aclose`.
    """

    _section = "mapping"
    _logger = _mapping_logger

    def _unavailable(self) -> ProxyError:
        return MappingUnavailable(_MAPPING_UNAVAILABLE)

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real study UID → examination ID."""
        result: dict[str, int] = {}
        for batch in batches(_valid_uids(uids), self.batch_size):
            asked = set(batch)
            result.update(
                (uid, exam_id)
                for exam_id, uid in await self._studies({"uids": batch})
                if uid in asked
            )
        return result

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """Examination ID → real study UID."""
        result: dict[int, str] = {}
        for batch in batches(valid_ids(exam_ids), self.batch_size):
            asked = set(batch)
            result.update(
                (exam_id, uid)
                for exam_id, uid in await self._studies({"ids": batch})
                if exam_id in asked
            )
        return result

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        """Real series UID → its entry."""
        result: dict[str, SeriesEntry] = {}
        for batch in batches(_valid_uids(uids), self.batch_size):
            asked = set(batch)
            result.update(
                (entry.series_uid, entry)
                for entry in await self._series({"uids": batch})
                if entry.series_uid in asked
            )
        return result

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        """Acquisition ID → its entry."""
        result: dict[int, SeriesEntry] = {}
        for batch in batches(valid_ids(acquisition_ids), self.batch_size):
            asked = set(batch)
            result.update(
                (entry.acquisition_id, entry)
                for entry in await self._series({"ids": batch})
                if entry.acquisition_id in asked
            )
        return result

    async def _probe(self) -> None:
        await self._exchange(
            "/studies/lookup",
            {"ids": [_PROBE_ID]},
            lambda data: _parse_answer(data, "studies", _study, _study_keys),
        )

    async def _studies(self, body: Mapping[str, list[Any]]) -> list[tuple[int, str]]:
        return await self._lookup("/studies/lookup", "studies", body, _study, _study_keys)

    async def _series(self, body: Mapping[str, list[Any]]) -> list[SeriesEntry]:
        return await self._lookup("/series/lookup", "series", body, _series_entry, _series_keys)

    async def _lookup(
        self,
        path: str,
        kind: str,
        body: Mapping[str, list[Any]],
        parse: Callable[[Any, str], _V],
        key: Callable[[_V], tuple[int, str]],
    ) -> list[_V]:
        return await self._post(path, body, lambda data: _parse_answer(data, kind, parse, key))


def _parse_answer(
    data: Any,
    kind: str,
    parse: Callable[[Any, str], _V],
    key: Callable[[_V], tuple[int, str]],
) -> list[_V]:
    if not isinstance(data, dict) or not isinstance(data.get(kind), list):
        raise Malformed(f"expected an object with a {kind!r} array")
    entries = [parse(item, f"{kind}[{index}]") for index, item in enumerate(data[kind])]
    # One ID per UID and one UID per ID: an ambiguous answer is not guessed at.
    keys = [key(entry) for entry in entries]
    if len({k[0] for k in keys}) != len(keys) or len({k[1] for k in keys}) != len(keys):
        raise Malformed(f"{kind}: the same ID or UID twice")
    return entries


def _study_keys(entry: tuple[int, str]) -> tuple[int, str]:
    return entry


def _series_keys(entry: SeriesEntry) -> tuple[int, str]:
    return entry.acquisition_id, entry.series_uid


def _study(item: Any, where: str) -> tuple[int, str]:
    if not isinstance(item, dict):
        raise Malformed(f"{where}: expected an object")
    return _answer_id(item, "id", where), _answer_uid(item, "study_uid", where)


def _series_entry(item: Any, where: str) -> SeriesEntry:
    if not isinstance(item, dict):
        raise Malformed(f"{where}: expected an object")
    return SeriesEntry(
        _answer_id(item, "id", where),
        _answer_id(item, "exam_id", where),
        _answer_uid(item, "series_uid", where),
    )


def _answer_id(item: Mapping[str, Any], key: str, where: str) -> int:
    value: Any = item.get(key)
    if not is_domain_id(value):
        raise Malformed(f"{where}.{key}: expected a positive integer")
    return int(value)


def _answer_uid(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not is_uid(value):
        raise Malformed(f"{where}.{key}: expected a UID (digits and dots, at most 64)")
    return str(value)


def answer_ids(values: Any, where: str) -> list[int]:
    """A JSON array of IDs in an answer."""
    if not isinstance(values, list) or not all(is_domain_id(value) for value in values):
        raise Malformed(f"{where}: expected an array of positive integers")
    return values


def _valid_uids(uids: Iterable[str]) -> list[str]:
    """The keys worth asking: a key no valid answer can hold is simply unknown."""
    return [uid for uid in dict.fromkeys(uids) if is_uid(uid)]


def valid_ids(ids: Iterable[int]) -> list[int]:
    return [value for value in dict.fromkeys(ids) if is_domain_id(value)]


def batches(keys: list[_K], size: int) -> Iterator[list[_K]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


class HttpAccessPolicy(PlatformClient):
    """The decisions of a platform that implements the access contract of ``docs/access.md``:
    ``POST {url}/access/visible`` and ``POST {url}/access/allowed`` (at most 1000 IDs a
    request).

    Requests carry the user's identity (user ID, subject, username, roles), never their token.
    Fails closed: a platform that cannot be reached, times out, answers anything but 200 or
    answers something the contract does not allow raises :class:`AccessUnavailable` (503).
    """

    _section = "access"
    _logger = _access_logger

    def _unavailable(self) -> ProxyError:
        return AccessUnavailable(_ACCESS_UNAVAILABLE)

    async def _probe(self) -> None:
        body = {"user": _PROBE_USER, "action": "read", "exam_ids": [_PROBE_ID]}
        await self._exchange("/access/allowed", body, _allowed_answer)

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """``POST {url}/access/visible``: everything, or the IDs."""
        body = {"user": _identity(principal), "action": action}
        return await self._post("/access/visible", body, _visible_answer)

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """``POST {url}/access/allowed``, one request per batch of IDs."""
        found: set[int] = set()
        user = _identity(principal)
        for batch in batches(valid_ids(exam_ids), self.batch_size):
            body = {"user": user, "action": action, "exam_ids": batch}
            answer = await self._post("/access/allowed", body, _allowed_answer)
            found.update(answer.intersection(batch))  # never more than was asked
        return frozenset(found)


def _identity(principal: Principal) -> dict[str, Any]:
    return {
        "id": principal.user_id,
        "subject": principal.subject,
        "username": principal.username,
        "roles": sorted(principal.roles),
    }


def _visible_answer(data: Any) -> Visible:
    if not isinstance(data, dict):
        raise Malformed("expected an object")
    everything = data.get("all", False)
    if not isinstance(everything, bool):
        raise Malformed("all: expected true or false")
    if everything:
        return ALL
    return frozenset(answer_ids(data.get("exam_ids"), "exam_ids"))


def _allowed_answer(data: Any) -> frozenset[int]:
    if not isinstance(data, dict):
        raise Malformed("expected an object")
    return frozenset(answer_ids(data.get("exam_ids"), "exam_ids"))
