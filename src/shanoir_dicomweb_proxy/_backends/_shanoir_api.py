"""Shanoir-NG's REST API as the ``shanoir`` backends read it (``docs/shanoir.md``).

What is read, and how it answers (Shanoir-NG's studies and datasets services, behind its
nginx): ``GET /studies/studies`` (studies with their members' rights), ``GET
/datasets/examinations`` and ``/datasets/examinations/preclinical/true`` (pages of
examinations), ``GET /datasets/datasetacquisition/examination/{id}`` (an examination's
acquisitions). Every call carries ``Content-Type: application/json`` (Spring answers 415
without it on some GETs); an empty answer is 204; a missing right is 403.

The client fails closed: Shanoir unreachable, slow, answering 401, 5xx or what the model does not
allow raises :class:`~shanoir_dicomweb_proxy.ShanoirUnavailable` (503), with a warning naming
the call and why, never a body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx

from .._errors import ShanoirUnavailable
from .._identifiers import is_domain_id, is_uid

__all__ = [
    "PAGE_SIZE",
    "Exam",
    "Membership",
    "ShanoirApi",
    "ShanoirForbidden",
    "exams",
    "memberships",
    "sorting_indexes",
]

logger = logging.getLogger("shanoir_dicomweb_proxy.shanoir")

#: Shanoir's largest page.
PAGE_SIZE: Final = 2000
_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=5.0)


class ShanoirForbidden(Exception):
    """Shanoir answered 403: the credentials used lack the right (a user's, for a user's call)."""


class _Malformed(Exception):
    """An answer the model does not allow; the message says where, never a value."""


@dataclass(frozen=True, slots=True)
class Exam:
    """An examination as Shanoir describes it (ExaminationDTO)."""

    id: int
    study_id: int
    center_id: int | None
    subject_name: str | None
    #: The real StudyInstanceUID; None for examinations imported before Shanoir stored it.
    study_uid: str | None
    #: The examination this one is a copy of.
    source: int | None = None


@dataclass(frozen=True, slots=True)
class Membership:
    """One user's row of a study (StudyUser): rights count only when ``confirmed``, and only on
    examinations of ``centers`` when it names any."""

    rights: frozenset[str]
    confirmed: bool
    centers: frozenset[int]


class ShanoirApi:
    """GETs on Shanoir-NG's API with a bearer token, answering decoded JSON (None for 204)."""

    def __init__(self, url: str, *, timeout: float, auth: httpx.Auth | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._auth = auth
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"ShanoirApi({self.url!r})"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False,
                timeout=httpx.Timeout(self.timeout),
                limits=_LIMITS,
                follow_redirects=False,
                auth=self._auth,
            )
        return self._client

    @staticmethod
    def unavailable() -> ShanoirUnavailable:
        """The error for a Shanoir that cannot answer (the details are in the log)."""
        return ShanoirUnavailable("Shanoir-NG cannot be reached to decide this request")

    async def aclose(self) -> None:
        """Close the HTTP client (a later call opens a new one)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def get(
        self, path: str, params: Mapping[str, str | int] | None = None, *, token: str | None
    ) -> Any:
        """``GET {url}{path}`` with ``token`` (None: the service credentials of ``auth``)."""
        what = f"Shanoir: GET {path}"
        headers = {"accept": "application/json", "content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        response = await self._send(what, "GET", path, params=params, headers=headers)
        status = response.status_code
        if status == 204:
            return None
        if status == 403:
            raise ShanoirForbidden(path)
        if status != 200:
            hint = " (the token was refused)" if status == 401 else ""
            logger.warning("%s: answered %d%s", what, status, hint)
            raise self.unavailable()
        try:
            return response.json()
        except ValueError:
            logger.warning("%s: the answer is not JSON", what)
            raise self.unavailable() from None

    async def post(
        self, path: str, content: AsyncIterator[bytes], *, token: str, headers: Mapping[str, str]
    ) -> int:
        """``POST {url}{path}`` of ``content`` with ``token``: the status (the body is read and
        dropped); unreachable or 5xx is :meth:`unavailable`."""
        what = f"Shanoir: POST {path}"
        sent = {**headers, "authorization": f"Bearer {token}", "accept": "application/json"}
        response = await self._send(what, "POST", path, content=content, headers=sent)
        if response.status_code >= 500 or response.status_code == 401:
            logger.warning("%s: answered %d", what, response.status_code)
            raise self.unavailable()
        return response.status_code

    async def _send(self, what: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response to one request; Shanoir unreachable or slow is :meth:`unavailable`."""
        try:
            return await self._http().request(method, self.url + path, **kwargs)
        except httpx.TimeoutException:
            logger.warning("%s: no answer in time", what)
            raise self.unavailable() from None
        except httpx.HTTPError as exc:
            logger.warning("%s: %s", what, type(exc).__name__)
            raise self.unavailable() from None

    async def status(self, path: str) -> int:
        """The status of an unauthenticated ``GET {url}{path}`` (readiness probes); raises
        :class:`httpx.HTTPError` when Shanoir cannot be reached."""
        headers = {"accept": "application/json"}
        response = await self._http().get(self.url + path, headers=headers, auth=None)
        return response.status_code

    async def pages(
        self, path: str, params: Mapping[str, str | int] | None = None, *, token: str | None
    ) -> list[Any]:
        """Every item of a paged answer (``page`` from 0, ``size`` :data:`PAGE_SIZE`)."""
        items: list[Any] = []
        page = 0
        while True:
            data = await self.get(
                path, {**(params or {}), "page": page, "size": PAGE_SIZE}, token=token
            )
            if data is None:
                return items
            if not isinstance(data, dict) or not isinstance(data.get("content"), list):
                logger.warning("Shanoir: GET %s: not a page", path)
                raise self.unavailable()
            items += data["content"]
            pages = data.get("totalPages")
            page += 1
            if not isinstance(pages, int) or page >= pages or not data["content"]:
                return items

    def parse(self, path: str, parse: Callable[[Any], Any], data: Any) -> Any:
        """``parse(data)``, a malformed answer being Shanoir unavailable."""
        try:
            return parse(data)
        except _Malformed as exc:
            logger.warning("Shanoir: GET %s: malformed answer: %s", path, exc)
            raise self.unavailable() from None


def exams(items: Any) -> Iterator[Exam]:
    """The examinations of ExaminationDTO objects."""
    if not isinstance(items, list):
        raise _Malformed("expected a list of examinations")
    for index, item in enumerate(items):
        where = f"examinations[{index}]"
        if not isinstance(item, dict):
            raise _Malformed(f"{where}: expected an object")
        subject = item.get("subject")
        name = subject.get("name") if isinstance(subject, dict) else None
        uid = item.get("studyInstanceUID")
        source = item.get("source")
        yield Exam(
            id=_id(item.get("id"), f"{where}.id"),
            study_id=_id(item.get("studyId"), f"{where}.studyId"),
            center_id=item["centerId"] if is_domain_id(item.get("centerId")) else None,
            subject_name=name if isinstance(name, str) and name else None,
            study_uid=uid if is_uid(uid) else None,
            source=source if is_domain_id(source) else None,
        )


def memberships(items: Any, user_id: str | None) -> dict[tuple[str, int], Membership]:
    """(userId, studyId) → the user's row, from StudyDTO objects; only ``user_id``'s rows when
    given."""
    if items is None:
        return {}
    if not isinstance(items, list):
        raise _Malformed("expected a list of studies")
    found: dict[tuple[str, int], Membership] = {}
    for index, study in enumerate(items):
        where = f"studies[{index}]"
        if not isinstance(study, dict):
            raise _Malformed(f"{where}: expected an object")
        study_id = _id(study.get("id"), f"{where}.id")
        rows = study.get("studyUserList") or []
        if not isinstance(rows, list):
            raise _Malformed(f"{where}.studyUserList: expected a list")
        for row in rows:
            if not isinstance(row, dict):
                raise _Malformed(f"{where}.studyUserList: expected objects")
            user = row.get("userId")
            if not is_domain_id(user):
                continue  # a row without a user (an invitation by e-mail) grants nobody
            if user_id is not None and str(user) != user_id:
                continue
            rights = row.get("studyUserRights") or []
            centers = row.get("centerIds") or []
            if not isinstance(rights, list) or not isinstance(centers, list):
                raise _Malformed(f"{where}.studyUserList: rights and centerIds are lists")
            found[str(user), study_id] = Membership(
                rights=frozenset(r for r in rights if isinstance(r, str)),
                confirmed=row.get("confirmed") is True,
                centers=frozenset(c for c in centers if is_domain_id(c)),
            )
    return found


def sorting_indexes(items: Any) -> dict[int, int]:
    """Acquisition ID → sortingIndex (the SeriesNumber), from DatasetAcquisitionDTO objects;
    acquisitions without one are left out."""
    if items is None:
        return {}
    if not isinstance(items, list):
        raise _Malformed("expected a list of acquisitions")
    found: dict[int, int] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _Malformed(f"acquisitions[{index}]: expected an object")
        sorting = item.get("sortingIndex")
        if type(sorting) is int:
            found[_id(item.get("id"), f"acquisitions[{index}].id")] = sorting
    return found


def _id(value: Any, where: str) -> int:
    if not is_domain_id(value):
        raise _Malformed(f"{where}: expected a positive integer")
    result: int = value
    return result
