"""The ``shanoir`` backends: examinations, acquisitions and rights from a running Shanoir-NG
(DESIGN §5b, ``docs/shanoir.md``).

- :class:`ShanoirDirectory`: what Shanoir says, fetched with the configured credentials and kept
  ``[shanoir] cache_ttl`` seconds. ``credentials = "service"``: one view for everybody (every
  study with every member, every examination), read with the proxy's own admin client.
  ``credentials = "user"``: one view per caller, read with the caller's own token (the studies
  and examinations Shanoir shows that user).
- :class:`ShanoirAccessPolicy`: the rights exactly as Shanoir decides them: ``read`` needs
  CAN_SEE_ALL, ``download`` CAN_DOWNLOAD, ``write`` CAN_IMPORT, on the examination's study, in a
  confirmed row, and on one of the row's centres when it names any; ``ROLE_ADMIN`` may do
  everything.
- :class:`ShanoirIdentifierMap`: an examination is the study of its StudyInstanceUID; an
  acquisition is the series of that study whose SeriesNumber is its ``sortingIndex`` (Shanoir
  exposes no series UID), found by asking the PACS. Answers depend on the caller (the
  examinations it may see decide between the copies of one study), so this map keeps its own
  caches of Shanoir's facts and is never put behind a shared cache. Under a copy's path, only
  the copy's own acquisitions are shown (:meth:`~ShanoirIdentifierMap.series_of_exam`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import anyio
import orjson

from .._access import ALL, Action, Visible, within
from .._dicom import SERIES_INSTANCE_UID, SERIES_NUMBER, STUDY_INSTANCE_UID, json_key, json_value
from .._errors import MappingUnavailable, ProxyError
from .._headers import header
from .._identifiers import SeriesEntry, is_uid
from .._scope import Principal, current_principal, get_principal
from .._types import Receive, Scope, Send
from .._upstream import Upstream
from ._shanoir_api import (
    Exam,
    Membership,
    ShanoirApi,
    ShanoirForbidden,
    exams,
    memberships,
    sorting_indexes,
)

__all__ = [
    "ADMIN_ROLE",
    "RIGHTS",
    "ShanoirAccessPolicy",
    "ShanoirDirectory",
    "ShanoirIdentifierMap",
    "ShanoirStow",
    "permits",
]

logger = logging.getLogger("shanoir_dicomweb_proxy.shanoir")

#: The right each action needs on the examination's study (Shanoir's StudyUserRight names).
RIGHTS: Final[Mapping[Action, str]] = {
    "read": "CAN_SEE_ALL",
    "download": "CAN_DOWNLOAD",
    "write": "CAN_IMPORT",
}
#: The realm role for which Shanoir checks no right.
ADMIN_ROLE: Final = "ROLE_ADMIN"

_T = TypeVar("_T")


def permits(member: Membership | None, exam: Exam, right: str) -> bool:
    """Shanoir's rule: ``right`` in a confirmed row of the user for the examination's study, and
    the examination in one of the row's centres when the row names any."""
    return (
        member is not None
        and member.confirmed
        and right in member.rights
        and (not member.centers or exam.center_id in member.centers)
    )


@dataclass(frozen=True, slots=True)
class View:
    """What one set of credentials sees of Shanoir."""

    exams: Mapping[int, Exam]
    #: (userId, studyId) → that user's row.
    members: Mapping[tuple[str, int], Membership]
    #: Real StudyInstanceUID → the examinations holding it (several for copies), by ID.
    by_study_uid: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, found: Iterable[Exam], members: Mapping[tuple[str, int], Membership]) -> View:
        by_id = {exam.id: exam for exam in found}
        by_uid: dict[str, list[int]] = {}
        for exam in by_id.values():
            if exam.study_uid is not None:
                by_uid.setdefault(exam.study_uid, []).append(exam.id)
        return cls(by_id, members, {uid: tuple(sorted(ids)) for uid, ids in by_uid.items()})

    def may(self, principal: Principal, action: Action, exam: Exam) -> bool:
        if ADMIN_ROLE in principal.roles:
            return True
        user = principal.user_id
        if user is None:
            return False
        return permits(self.members.get((user, exam.study_id)), exam, RIGHTS[action])


@dataclass(slots=True)
class _Entry:
    value: Any
    until: float


class ShanoirDirectory:
    """Shanoir's examinations, rights and acquisitions, fetched with the configured credentials
    and kept ``ttl`` seconds (never past the token they were fetched with). Concurrent callers
    wanting the same answer share one fetch; failures are not kept."""

    def __init__(
        self,
        api: ShanoirApi,
        *,
        credentials: Literal["user", "service"],
        ttl: float,
        timer: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.credentials = credentials
        self.ttl = ttl
        self._timer = timer
        self._cache: dict[Any, _Entry] = {}
        self._locks: dict[Any, anyio.Lock] = {}

    def __repr__(self) -> str:
        return f"ShanoirDirectory({self.api!r}, credentials={self.credentials!r})"

    async def aclose(self) -> None:
        await self.api.aclose()

    def _token(self, principal: Principal | None) -> str | None:
        """The token a call is made with: the caller's, or None for the service credentials."""
        if self.credentials == "service":
            return None
        if principal is None or not principal.token:
            logger.warning('Shanoir: no caller\'s token to ask with (credentials = "user")')
            raise self.api.unavailable()
        return principal.token

    async def _kept(
        self, key: Any, principal: Principal | None, fetch: Callable[[], Awaitable[_T]]
    ) -> _T:
        """``fetch()``'s answer under ``key``, kept ``ttl`` seconds (and no longer than the
        token of ``principal`` when the caller's token was used)."""
        if self.ttl <= 0:
            return await fetch()  # nothing kept: nothing to share either
        now = self._timer()
        hit = self._cache.get(key)
        if hit is not None and hit.until > now:
            value: _T = hit.value
            return value
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:
            hit = self._cache.get(key)
            if hit is not None and hit.until > self._timer():
                value = hit.value
                return value
            answer = await fetch()
            until = self._timer() + self.ttl
            if self.credentials == "user" and principal is not None:
                until = min(until, principal.expires_at or math.inf)
            self._cache[key] = _Entry(answer, until)
        self._forget_expired()
        return answer

    def _forget_expired(self) -> None:
        """Drop expired answers, and the locks of keys no one waits on, past 1024 of them."""
        if len(self._cache) < 1024 and len(self._locks) < 1024:
            return
        now = self._timer()
        for key in [k for k, e in self._cache.items() if e.until <= now]:
            del self._cache[key]
        for key in [k for k, lock in self._locks.items() if not lock.locked()]:
            if key not in self._cache:
                del self._locks[key]

    async def view(self, principal: Principal | None) -> View:
        """Every examination and row the credentials show: the service's, or the caller's."""
        token = self._token(principal)
        if token is None:
            return await self._kept(("view",), None, self._service_view)
        assert principal is not None
        key = ("view", principal.token_id, principal.user_id)
        return await self._kept(key, principal, lambda: self._user_view(token, principal))

    async def _service_view(self) -> View:
        studies = await self.api.get("/studies/studies", token=None)
        members = self.api.parse("/studies/studies", lambda d: memberships(d, None), studies)
        return View.of(await self._exams(None), members)

    async def _user_view(self, token: str, principal: Principal) -> View:
        try:
            studies = await self.api.get("/studies/studies", token=token)
        except ShanoirForbidden:
            return View({}, {})  # no Shanoir role: nothing to see
        user = principal.user_id
        rows = self.api.parse("/studies/studies", lambda d: memberships(d, user), studies)
        return View.of(await self._exams(token), rows if user is not None else {})

    async def _exams(self, token: str | None) -> list[Exam]:
        found: list[Exam] = []
        for path in ("/datasets/examinations", "/datasets/examinations/preclinical/true"):
            try:
                items = await self.api.pages(path, token=token)
            except ShanoirForbidden:
                continue
            found += self.api.parse(path, lambda d: list(exams(d)), items)
        return found

    async def acquisitions(self, exam_id: int, principal: Principal | None) -> dict[int, int]:
        """The examination's acquisitions: acquisition ID → sortingIndex (its SeriesNumber)."""
        token = self._token(principal)
        path = f"/datasets/datasetacquisition/examination/{exam_id}"

        async def fetch() -> dict[int, int]:
            try:
                data = await self.api.get(path, token=token)
            except ShanoirForbidden:
                return {}
            found: dict[int, int] = self.api.parse(path, sorting_indexes, data)
            return found

        # Acquisitions are facts, not rights: shared by every caller who may see the exam.
        return await self._kept(("acquisitions", exam_id), principal, fetch)


class ShanoirAccessPolicy:
    """The access policy of ``[access] backend = "shanoir"`` (see the module)."""

    def __init__(self, directory: ShanoirDirectory) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"ShanoirAccessPolicy({self.directory!r})"

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """Every examination Shanoir lets ``principal`` ``action``."""
        if ADMIN_ROLE in principal.roles:
            return ALL
        view = await self.directory.view(principal)
        return frozenset(e.id for e in view.exams.values() if view.may(principal, action, e))

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The subset of ``exam_ids`` Shanoir lets ``principal`` ``action``."""
        if not exam_ids:
            return frozenset()
        return within(await self.visible(principal, action), exam_ids)


class ShanoirIdentifierMap:
    """The identifier map of ``[mapping] backend = "shanoir"`` (see the module).

    Acquisitions are matched to the PACS's series of the examination's study by
    SeriesNumber = ``sortingIndex``; a number two series share matches neither. Of the copies of
    one study (several examinations, one StudyInstanceUID), the one the caller sees is chosen,
    the original first.
    """

    def __init__(
        self,
        directory: ShanoirDirectory,
        upstream: Upstream,
        *,
        patient_name: Literal["copies", "always", "never"] = "copies",
    ) -> None:
        self.directory = directory
        self.upstream = upstream
        self.patient_name = patient_name
        #: Examination → (real series UID → acquisition ID), kept as long as the directory.
        self._series: dict[int, tuple[float, dict[str, int]]] = {}

    def __repr__(self) -> str:
        return f"ShanoirIdentifierMap({self.directory!r})"

    async def _view(self) -> tuple[View, Principal | None]:
        principal = current_principal()
        return await self.directory.view(principal), principal

    def _readable(
        self, view: View, principal: Principal | None, exam_ids: Iterable[int]
    ) -> list[int]:
        """The examinations among ``exam_ids`` the caller may read, originals first."""
        exams_ = [view.exams[e] for e in exam_ids if e in view.exams]
        if principal is not None and self.directory.credentials == "service":
            exams_ = [e for e in exams_ if view.may(principal, "read", e)]
        return [e.id for e in sorted(exams_, key=lambda e: (e.source is not None, e.id))]

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """Examination ID → its real StudyInstanceUID."""
        view, _ = await self._view()
        found = (view.exams.get(e) for e in exam_ids)
        return {e.id: e.study_uid for e in found if e is not None and e.study_uid is not None}

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real StudyInstanceUID → the examination the caller sees of it."""
        view, principal = await self._view()
        result: dict[str, int] = {}
        for uid in uids:
            readable = self._readable(view, principal, view.by_study_uid.get(uid, ()))
            if readable:
                result[uid] = readable[0]
        return result

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        """Acquisition ID → its series, among the examinations the caller's view holds."""
        view, principal = await self._view()
        wanted = set(acquisition_ids)
        result: dict[int, SeriesEntry] = {}
        for exam_id in self._readable(view, principal, view.exams):
            if not wanted:
                break
            exam = view.exams[exam_id]
            acquisitions = await self.directory.acquisitions(exam.id, principal)
            if wanted.isdisjoint(acquisitions):
                continue
            for series_uid, acquisition in (await self._series_of(exam, principal)).items():
                if acquisition in wanted:
                    result[acquisition] = SeriesEntry(acquisition, exam.id, series_uid)
                    wanted.discard(acquisition)
        return result

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        """Real SeriesInstanceUID → the acquisition it is, in the examination the caller sees."""
        view, principal = await self._view()
        studies = await self._studies_of(uids)
        result: dict[str, SeriesEntry] = {}
        for study_uid in set(studies.values()):
            for exam_id in self._readable(view, principal, view.by_study_uid.get(study_uid, ())):
                series = await self._series_of(view.exams[exam_id], principal)
                for uid, study in studies.items():
                    if study == study_uid and uid not in result and uid in series:
                        result[uid] = SeriesEntry(series[uid], exam_id, uid)
        return result

    async def subject_names(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """The subject's name, for copies (``patient_name = "copies"``, as Shanoir does) or
        for every examination (``"always"``); none with ``"never"``."""
        if self.patient_name == "never":
            return {}
        view, _ = await self._view()
        found = (view.exams.get(e) for e in exam_ids)
        return {
            e.id: e.subject_name
            for e in found
            if e is not None
            and e.subject_name is not None
            and (self.patient_name == "always" or e.source is not None)
        }

    async def exams_of_studies(self, study_uids: Collection[str]) -> Mapping[str, tuple[int, ...]]:
        """The examinations of each real study the caller may read, originals first."""
        view, principal = await self._view()
        found = {
            uid: self._readable(view, principal, view.by_study_uid.get(uid, ()))
            for uid in study_uids
        }
        return {uid: tuple(exams) for uid, exams in found.items() if exams}

    async def series_of_exam(self, exam_id: int) -> tuple[Mapping[str, SeriesEntry], bool]:
        """The examination's acquisitions by real series UID; a copy holds nothing else (the
        rest of its study belongs to the original)."""
        view, principal = await self._view()
        exam = view.exams.get(exam_id)
        if exam is None:
            return {}, True
        own = await self._series_of(exam, principal)
        entries = {uid: SeriesEntry(acquisition, exam_id, uid) for uid, acquisition in own.items()}
        return entries, exam.source is not None

    async def _series_of(self, exam: Exam, principal: Principal | None) -> dict[str, int]:
        """The examination's acquisitions by their real series UID."""
        now = time.monotonic()
        hit = self._series.get(exam.id)
        if hit is not None and hit[0] > now:
            return hit[1]
        acquisitions = await self.directory.acquisitions(exam.id, principal)
        by_number: dict[int, list[str]] = {}
        if acquisitions and exam.study_uid is not None:
            query = f"?includefield={json_key(SERIES_NUMBER)}"
            for row in await self._qido(f"/studies/{exam.study_uid}/series{query}"):
                uid, number = json_value(row, SERIES_INSTANCE_UID), json_value(row, SERIES_NUMBER)
                if is_uid(uid) and _series_number(number) is not None:
                    by_number.setdefault(_series_number(number) or 0, []).append(str(uid))
        found: dict[str, int] = {}
        for acquisition, index in acquisitions.items():
            series = by_number.get(index, [])
            if len(series) == 1:
                found[series[0]] = acquisition
            elif series:
                logger.warning(
                    "Shanoir: examination %d: %d series share SeriesNumber %d; acquisition %d "
                    "matches none",
                    exam.id,
                    len(series),
                    index,
                    acquisition,
                )
        if self.directory.ttl > 0:
            self._series[exam.id] = (now + self.directory.ttl, found)
        return found

    async def _studies_of(self, series_uids: Collection[str]) -> dict[str, str]:
        """Real series UID → real study UID, from the PACS."""
        valid = [uid for uid in series_uids if is_uid(uid)]
        found: dict[str, str] = {}
        for start in range(0, len(valid), 100):
            batch = ",".join(valid[start : start + 100])
            target = (
                f"/series?SeriesInstanceUID={batch}&includefield={json_key(STUDY_INSTANCE_UID)}"
            )
            for row in await self._qido(target):
                uid, study = (
                    json_value(row, SERIES_INSTANCE_UID),
                    json_value(row, STUDY_INSTANCE_UID),
                )
                if is_uid(uid) and is_uid(study):
                    found[str(uid)] = str(study)
        return found

    async def _qido(self, target: str) -> list[dict[str, Any]]:
        """A search of the PACS, with the proxy's own credentials."""
        try:
            response = await self.upstream.send(
                "GET", target, headers=[(b"accept", b"application/dicom+json")]
            )
        except ProxyError:
            raise _mapping_unavailable() from None
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        if response.status_code == 204:
            return []
        if response.status_code != 200:
            logger.warning("Shanoir map: the PACS answered a search with %d", response.status_code)
            raise _mapping_unavailable()
        try:
            rows = orjson.loads(body or b"[]")
        except orjson.JSONDecodeError:
            raise _mapping_unavailable() from None
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _series_number(value: object) -> int | None:
    """SeriesNumber (IS): a JSON number, or a string from some servers."""
    try:
        return int(str(value).strip()) if value is not None else None
    except ValueError:
        return None


def _mapping_unavailable() -> ProxyError:
    return MappingUnavailable("the identifier mapping cannot be reached")


class ShanoirStow:
    """Where uploads go with the ``shanoir`` map: Shanoir-NG's own STOW route (``POST
    /datasets/dicomweb/studies``), which registers each SEG or SR as a dataset of the
    examination its public study UID names and stores it in the PACS; with the caller's token.

    An ASGI app in the place of the upstream for the spooled batch of admitted instances. Shanoir
    answers an empty 200, which says nothing of what was stored: the STOW layer asks the PACS.
    Shanoir unreachable or failing is :class:`ShanoirUnavailable`; its body is never passed on.
    """

    def __init__(self, api: ShanoirApi) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = get_principal(scope)
        if principal is None or not principal.token:
            logger.warning("Shanoir: an upload without a caller's token to send it with")
            raise self.api.unavailable()
        content_type = header(scope, b"content-type") or b""
        length = header(scope, b"content-length") or b"0"

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        status = await self.api.post(
            "/datasets/dicomweb/studies",
            body(),
            token=principal.token,
            headers={
                "content-type": content_type.decode("latin-1"),
                "content-length": length.decode("latin-1"),
            },
        )
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
