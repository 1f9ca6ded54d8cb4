"""The identifier map backends of ``[mapping] backend`` (DESIGN §5), and the one function that
builds the configured one.

- :class:`StaticIdentifierMap`: a TOML or JSON file (or any ``store import`` file), read once.
- :class:`HttpIdentifierMap`: a small REST contract a platform implements (``docs/backends.md``).
- ``sqlite``: :class:`~shanoir_dicomweb_proxy._store.SqliteIdentifierMap` over the store.
- ``identity``: no map at all.

:func:`build_identifier_map` puts a :class:`~shanoir_dicomweb_proxy._store.CachingIdentifierMap`
in front of each.

The helpers the access policies share with these (``_policies``) live here too: reading a
TOML/JSON file (:func:`_read_document`), a platform's JSON API (:class:`_PlatformClient`), what
a built backend must close (:class:`_Owning`).
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import httpx

from ._config import Settings
from ._errors import ConfigError, MappingUnavailable, ProxyError
from ._identifiers import IdentifierMap, SeriesEntry
from ._store import CachingIdentifierMap, SqliteIdentifierMap, SqliteStore, load_import_file
from ._store._importing import _check_keys
from ._store._sqlite import (
    _MAX_ID,
    _UID,
    ImportRow,
    StoreError,
    _check_id,
    _check_row,
    _check_uid,
)

__all__ = [
    "HttpIdentifierMap",
    "ManagedIdentifierMap",
    "StaticIdentifierMap",
    "build_identifier_map",
    "open_store",
]

logger = logging.getLogger("shanoir_dicomweb_proxy.mapping")

_K = TypeVar("_K")
_V = TypeVar("_V")

# --- static ----------------------------------------------------------------------------------

_EXAM_KEYS = frozenset({"id", "study_uid", "acquisitions"})
_ACQUISITION_KEYS = frozenset({"id", "series_uid"})


class StaticIdentifierMap:
    """An identifier map held in memory, from rows checked once: dictionary lookups.

    :meth:`from_file` reads the ``[mapping] file`` formats (``docs/backends.md``). An ID or UID
    bound twice, to the same or another value, is a :class:`ConfigError` naming both rows.
    """

    def __init__(self, rows: Iterable[ImportRow], *, source: str = "") -> None:
        self.source = source
        self._exam_ids: dict[str, int] = {}
        self._study_uids: dict[int, str] = {}
        self._series_by_uid: dict[str, SeriesEntry] = {}
        self._series_by_id: dict[int, SeriesEntry] = {}
        try:
            self._index(rows)
        except StoreError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> StaticIdentifierMap:
        """Read a TOML file (by its ``.toml`` suffix), a JSON object of the same shape, or any
        file ``store import`` reads (a JSON array, or CSV).
        """
        path = Path(path)
        with _file_errors(path):
            if path.suffix.lower() == ".toml":
                data = _read_toml(path)
            else:
                text = _read_text(path)
                if not text.lstrip().startswith("{"):
                    try:
                        rows = load_import_file(path)  # its messages name the file
                    except StoreError as exc:
                        raise ConfigError(str(exc)) from None
                    return cls(rows, source=str(path))
                data = _read_json_object(text)
        return cls(_table_rows(data), source=str(path))

    def __repr__(self) -> str:
        return (
            f"StaticIdentifierMap({self.source!r}, {len(self._study_uids)} examinations, "
            f"{len(self._series_by_id)} acquisitions)"
        )

    def _index(self, rows: Iterable[ImportRow]) -> None:
        origin: dict[tuple[str, object], str] = {}  # which row bound an ID or UID first
        for number, row in enumerate(rows, 1):
            where = row.where or f"row {number}"
            _check_row(row, where)
            exam_id, study_uid = row.exam_id, row.study_uid
            known = self._study_uids.get(exam_id)
            if known is not None and known != study_uid:
                raise StoreError(
                    f"{where}: examination {exam_id} is already study {known} "
                    f"({origin['exam', exam_id]}); this entry says study {study_uid}"
                )
            bound = self._exam_ids.get(study_uid)
            if bound is not None and bound != exam_id:
                raise StoreError(
                    f"{where}: study {study_uid} is already examination {bound} "
                    f"({origin['study', study_uid]}); this entry says examination {exam_id}"
                )
            if known is None:
                self._study_uids[exam_id] = study_uid
                self._exam_ids[study_uid] = exam_id
                origin["exam", exam_id] = origin["study", study_uid] = where
            if row.acquisition_id is None:
                # An examination on its own: once (flat rows repeat it once per acquisition).
                if ("alone", exam_id) in origin:
                    raise StoreError(
                        f"{where}: examination {exam_id} is listed twice "
                        f"(also {origin['alone', exam_id]})"
                    )
                origin["alone", exam_id] = where
                continue
            assert row.series_uid is not None
            entry = SeriesEntry(row.acquisition_id, exam_id, row.series_uid)
            if entry.acquisition_id in self._series_by_id:
                raise StoreError(
                    f"{where}: acquisition {entry.acquisition_id} is listed twice "
                    f"(also {origin['acquisition', entry.acquisition_id]})"
                )
            other = self._series_by_uid.get(entry.series_uid)
            if other is not None:
                raise StoreError(
                    f"{where}: series {entry.series_uid} is already acquisition "
                    f"{other.acquisition_id} ({origin['series', entry.series_uid]}); "
                    f"this entry says acquisition {entry.acquisition_id}"
                )
            self._series_by_id[entry.acquisition_id] = entry
            self._series_by_uid[entry.series_uid] = entry
            origin["acquisition", entry.acquisition_id] = origin["series", entry.series_uid] = where

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real study UID → examination ID."""
        return _pick(self._exam_ids, uids)

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """Examination ID → real study UID."""
        return _pick(self._study_uids, exam_ids)

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        """Real series UID → its entry."""
        return _pick(self._series_by_uid, uids)

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        """Acquisition ID → its entry."""
        return _pick(self._series_by_id, acquisition_ids)


def _pick(table: Mapping[_K, _V], keys: Collection[_K]) -> dict[_K, _V]:
    return {key: table[key] for key in keys if key in table}


def _read_document(path: Path) -> Any:
    """A TOML file (by its ``.toml`` suffix) or a JSON one, parsed; every problem is a
    :class:`ConfigError` naming the file."""
    with _file_errors(path):
        if path.suffix.lower() == ".toml":
            return _read_toml(path)
        return _read_json_object(_read_text(path))


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


def _read_toml(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise StoreError(f"invalid TOML: {exc}") from None


def _read_json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None


@contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    """Reading ``path``: its errors (and :class:`StoreError` from checks) as ConfigError."""
    try:
        yield
    except StoreError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _file_items(
    data: Any, key: str, keys: frozenset[str], what: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of the array ``data[key]``, the one key of a file, each with where it is
    (``item 2``) and its keys checked: ``what`` describes one in errors (StoreError)."""
    article = "an" if key[0] in "aeiou" else "a"
    if not isinstance(data, dict):
        raise StoreError(f"expected an object with {article} '{key}' array")
    _check_keys("top level", data, frozenset({key}))
    items = data.get(key)
    if not isinstance(items, list):
        raise StoreError(f"{key}: expected an array of {key}")
    for index, item in enumerate(items, 1):
        where = f"item {index}"
        if not isinstance(item, dict):
            raise StoreError(f"{where}: expected {what}")
        _check_keys(where, item, keys)
        yield where, item


def _table_rows(data: Any) -> Iterator[ImportRow]:
    """The rows of ``{"examinations": [{"id", "study_uid", "acquisitions": [...]}]}``."""
    what = "an examination (id, study_uid, acquisitions)"
    for where, exam in _file_items(data, "examinations", _EXAM_KEYS, what):
        exam_id: Any = exam.get("id")
        study_uid: Any = exam.get("study_uid")
        _check_id(where, "id", exam_id)
        _check_uid(where, "study_uid", study_uid)
        yield ImportRow(exam_id, study_uid, where=where)
        acquisitions = exam.get("acquisitions", [])
        if not isinstance(acquisitions, list):
            raise StoreError(f"{where}: acquisitions: expected an array")
        for number, acquisition in enumerate(acquisitions, 1):
            inner = f"{where}, acquisition {number}"
            if not isinstance(acquisition, dict):
                raise StoreError(f"{inner}: expected an acquisition (id, series_uid)")
            _check_keys(inner, acquisition, _ACQUISITION_KEYS)
            acquisition_id, series_uid = acquisition.get("id"), acquisition.get("series_uid")
            _check_id(inner, "id", acquisition_id)
            _check_uid(inner, "series_uid", series_uid)
            yield ImportRow(exam_id, study_uid, acquisition_id, series_uid, where=inner)


# --- http ------------------------------------------------------------------------------------

_BATCH = 1000  # keys per request at most
_TIMEOUT = httpx.Timeout(10.0, connect=5.0, pool=5.0)
_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=5.0)
_UNAVAILABLE = "the identifier mapping cannot be reached"


class _Malformed(Exception):
    """The platform's answer breaks the contract; the message names where, never a value."""


class _PlatformClient:
    """The client of a platform's JSON API (``POST {url}{path}``), failing closed.

    A platform that cannot be reached, times out, answers anything but 200, or answers what is
    not JSON or what the contract does not allow (:class:`_Malformed`) raises
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

    async def _post(self, path: str, body: Mapping[str, Any], parse: Callable[[Any], _V]) -> _V:
        """POST ``body`` as JSON; ``parse`` the decoded answer (raising :class:`_Malformed`)."""
        what = f"{self._section} platform: POST {self.url}{path}"
        log = self._logger
        try:
            response = await self._http().post(self.url + path, json=body, headers=self._headers)
        except httpx.TimeoutException:
            log.warning("%s: no answer in time", what)
            raise self._unavailable() from None
        except httpx.HTTPError as exc:
            log.warning("%s: %s: %s", what, type(exc).__name__, exc)
            raise self._unavailable() from None
        if response.status_code != 200:
            hint = f" (check [{self._section}] token)" if response.status_code in (401, 403) else ""
            log.warning("%s: answered %d%s", what, response.status_code, hint)
            raise self._unavailable()
        try:
            try:
                data = json.loads(response.content)
            except ValueError:
                raise _Malformed("not JSON") from None
            return parse(data)
        except _Malformed as exc:
            log.warning("%s: malformed answer: %s", what, exc)
            raise self._unavailable() from None


class HttpIdentifierMap(_PlatformClient):
    """The identifier map of a platform that implements the lookup contract of
    ``docs/backends.md``: ``POST {url}/studies/lookup`` and ``POST {url}/series/lookup``, one
    request per batch of at most 1000 keys.

    Fails closed: a platform that cannot be reached, times out, answers anything but 200 or
    answers something the contract does not allow raises :class:`MappingUnavailable` (503).
    Uses one ``httpx.AsyncClient``, opened on first use, closed by :meth:`aclose`.
    """

    _section = "mapping"
    _logger = logger

    def _unavailable(self) -> ProxyError:
        return MappingUnavailable(_UNAVAILABLE)

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real study UID → examination ID."""
        result: dict[str, int] = {}
        for batch in _batches(_valid_uids(uids), self.batch_size):
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
        for batch in _batches(_valid_ids(exam_ids), self.batch_size):
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
        for batch in _batches(_valid_uids(uids), self.batch_size):
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
        for batch in _batches(_valid_ids(acquisition_ids), self.batch_size):
            asked = set(batch)
            result.update(
                (entry.acquisition_id, entry)
                for entry in await self._series({"ids": batch})
                if entry.acquisition_id in asked
            )
        return result

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
        raise _Malformed(f"expected an object with a {kind!r} array")
    entries = [parse(item, f"{kind}[{index}]") for index, item in enumerate(data[kind])]
    # One ID per UID and one UID per ID: an ambiguous answer is not guessed at.
    keys = [key(entry) for entry in entries]
    if len({k[0] for k in keys}) != len(keys) or len({k[1] for k in keys}) != len(keys):
        raise _Malformed(f"{kind}: the same ID or UID twice")
    return entries


def _study_keys(entry: tuple[int, str]) -> tuple[int, str]:
    return entry


def _series_keys(entry: SeriesEntry) -> tuple[int, str]:
    return entry.acquisition_id, entry.series_uid


def _study(item: Any, where: str) -> tuple[int, str]:
    if not isinstance(item, dict):
        raise _Malformed(f"{where}: expected an object")
    return _answer_id(item, "id", where), _answer_uid(item, "study_uid", where)


def _series_entry(item: Any, where: str) -> SeriesEntry:
    if not isinstance(item, dict):
        raise _Malformed(f"{where}: expected an object")
    return SeriesEntry(
        _answer_id(item, "id", where),
        _answer_id(item, "exam_id", where),
        _answer_uid(item, "series_uid", where),
    )


def _answer_id(item: Mapping[str, Any], key: str, where: str) -> int:
    value: Any = item.get(key)
    if not _is_id(value):
        raise _Malformed(f"{where}.{key}: expected a positive integer")
    return int(value)


def _answer_uid(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not _is_uid(value):
        raise _Malformed(f"{where}.{key}: expected a UID (digits and dots, at most 64)")
    return str(value)


def _answer_ids(values: Any, where: str) -> list[int]:
    """A JSON array of IDs in an answer."""
    if not isinstance(values, list) or not all(_is_id(value) for value in values):
        raise _Malformed(f"{where}: expected an array of positive integers")
    return values


def _is_id(value: object) -> bool:
    return type(value) is int and 0 < value <= _MAX_ID


def _is_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def _valid_uids(uids: Iterable[str]) -> list[str]:
    """The keys worth asking: a key no valid answer can hold is simply unknown."""
    return [uid for uid in dict.fromkeys(uids) if _is_uid(uid)]


def _valid_ids(ids: Iterable[int]) -> list[int]:
    return [value for value in dict.fromkeys(ids) if _is_id(value)]


def _batches(keys: list[_K], size: int) -> Iterator[list[_K]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


# --- the configured map ----------------------------------------------------------------------

_MAXSIZE = 100_000


Closer = Callable[[], Awaitable[None]]


class _Owning:
    """Owns what a backend opened (its store, its HTTP client): call :meth:`aclose` (or use
    ``async with``) when done."""

    _closers: list[Closer]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release what the backend holds (the store it opened, its HTTP client); idempotent."""
        closers, self._closers = self._closers, []
        for close in closers:
            await close()


class ManagedIdentifierMap(CachingIdentifierMap, _Owning):
    """The configured backend behind its cache, owning what the backend opened: call
    :meth:`aclose` (or use ``async with``) when done.
    """

    def __init__(
        self, inner: IdentifierMap, *, ttl: float, maxsize: int, closers: Iterable[Closer] = ()
    ) -> None:
        super().__init__(inner, ttl=ttl, maxsize=maxsize)
        self._closers = list(closers)


def build_identifier_map(
    settings: Settings, *, store: SqliteStore | None = None
) -> ManagedIdentifierMap | None:
    """The identifier map ``[mapping]`` configures, behind a cache of ``cache_ttl`` seconds;
    None for ``backend = "identity"``.

    ``sqlite`` uses ``store`` when given (and leaves it open), else opens ``[store] path`` and
    closes it in :meth:`ManagedIdentifierMap.aclose`. ``static`` reads its file now: a bad
    file is a :class:`ConfigError`.
    """
    mapping = settings.mapping
    closers: list[Closer] = []
    inner: IdentifierMap
    if mapping.backend == "identity":
        return None
    if mapping.backend == "sqlite":
        store = store if store is not None else _open_store(settings, closers)
        inner = SqliteIdentifierMap(store)
    elif mapping.backend == "static":
        try:
            inner = StaticIdentifierMap.from_file(mapping.file)
        except ConfigError as exc:
            raise ConfigError(f"[mapping] file: {exc}") from None
    else:
        http = HttpIdentifierMap(mapping.url, token=mapping.token)
        closers.append(http.aclose)
        inner = http
    return ManagedIdentifierMap(inner, ttl=mapping.cache_ttl, maxsize=_MAXSIZE, closers=closers)


def open_store(settings: Settings) -> SqliteStore:
    """Open ``[store] path`` (created if missing); a store that cannot be used is a
    :class:`ConfigError`."""
    try:
        return SqliteStore(settings.store.path)
    except StoreError as exc:
        raise ConfigError(f"[store] path: {exc}") from None


def _open_store(settings: Settings, closers: list[Closer]) -> SqliteStore:
    """:func:`open_store`, with its closer added to ``closers``."""
    store = open_store(settings)

    async def close() -> None:
        store.close()

    closers.append(close)
    return store
