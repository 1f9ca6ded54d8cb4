"""A Shanoir-NG API on loopback, written from ``../shared/SHANOIR.md`` (what Shanoir-NG exposes),
for the ``shanoir`` backends: the studies service (studies with their members' rights) and the
datasets service (examinations, acquisitions), behind the same paths as Shanoir's nginx.

It behaves as that document says Shanoir does: tokens are checked (signature and issuer, no
audience) against the tests' OpenID provider; every call needs ``Content-Type:
application/json`` (415 without); the OpenAPI documents need no token; empty answers are 204;
pages are Spring pages; a missing right is 403; ``ROLE_ADMIN`` sees everything; a right counts
only in a confirmed row, and only on the row's centres when it names any. ``admins`` names
token subjects given ``ROLE_ADMIN`` by the operator (the realm's service account, for
``credentials = "service"``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pydicom
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from pydicom.dataset import Dataset

from .loopback_http import running

BASE = "/shanoir-ng"
#: Shanoir's UIDGeneration.ROOT: public study UIDs are ROOT.<examinationId>.
ROOT = "1.4.9.12.34.1.8527"
RIGHTS = ("CAN_ADMINISTRATE", "CAN_IMPORT", "CAN_DOWNLOAD", "CAN_SEE_ALL", "CAN_EXECUTE")
_USER_ROLES = {"ROLE_ADMIN", "ROLE_EXPERT", "ROLE_USER"}


@dataclass
class Member:
    """A StudyUser row."""

    user_id: int
    rights: tuple[str, ...]
    confirmed: bool = True
    center_ids: tuple[int, ...] = ()


@dataclass
class Study:
    id: int
    name: str
    members: list[Member] = field(default_factory=list)


@dataclass
class Examination:
    id: int
    study_id: int
    center_id: int
    subject_id: int
    subject_name: str
    study_instance_uid: str | None
    preclinical: bool = False
    source: int | None = None
    copies: tuple[int, ...] = ()


@dataclass
class Acquisition:
    id: int
    examination_id: int
    sorting_index: int
    name: str = "acquisition"


@dataclass
class Caller:
    user_id: int | None
    roles: frozenset[str]

    @property
    def admin(self) -> bool:
        return "ROLE_ADMIN" in self.roles


@dataclass
class ShanoirWorld:
    """The studies, examinations and acquisitions the API serves, and what it was asked."""

    issuer: str
    jwks: dict[str, Any]
    studies: list[Study] = field(default_factory=list)
    examinations: list[Examination] = field(default_factory=list)
    acquisitions: list[Acquisition] = field(default_factory=list)
    admins: set[str] = field(default_factory=set)
    #: Seconds every answer waits (a slow Shanoir); ``down`` answers 500 to everything.
    delay: float = 0.0
    down: bool = False
    #: (method, path with query, user id or None) of every call.
    calls: list[tuple[str, str, int | None]] = field(default_factory=list)
    #: Orthanc's REST root, where uploads are stored (Shanoir stores them in its PACS).
    pacs: str = ""
    #: Every instance uploaded: (user id, the instance as Shanoir received it).
    uploads: list[tuple[int | None, Dataset]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the rights rule ---------------------------------------------------------------------

    def allowed(self, caller: Caller, exam: Examination, right: str) -> bool:
        if caller.admin:
            return True
        study = self._study(exam.study_id)
        row = self._row(study, caller.user_id) if study else None
        return (
            row is not None
            and row.confirmed
            and right in row.rights
            and (not row.center_ids or exam.center_id in row.center_ids)
        )

    def _study(self, study_id: int) -> Study | None:
        return next((s for s in self.studies if s.id == study_id), None)

    @staticmethod
    def _row(study: Study, user_id: int | None) -> Member | None:
        return next((m for m in study.members if m.user_id == user_id), None)

    # --- the API ------------------------------------------------------------------------------

    def caller(self, authorization: str | None) -> Caller | None:
        """The validated token's caller, None when no valid bearer token was sent."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        try:
            token = jwt.decode(authorization[7:], KeySet.import_key_set(self.jwks))
        except (JoseError, ValueError):
            return None
        claims = token.claims
        if claims.get("iss") != self.issuer or claims.get("exp", 0) < time.time():
            return None
        roles = set(claims.get("realm_access", {}).get("roles", []))
        if claims.get("sub") in self.admins:
            roles.add("ROLE_ADMIN")
        user_id = claims.get("userId")
        return Caller(int(user_id) if user_id is not None else None, frozenset(roles))

    def answer(self, caller: Caller, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if not caller.roles & _USER_ROLES:
            return 403, {"message": "Access Denied"}
        if path == "/studies/studies":
            return self._studies(caller)
        if path == "/studies/studies/rights/all":
            rights = {
                str(s.id): list(row.rights)
                for s in self.studies
                if (row := self._row(s, caller.user_id)) is not None
            }
            return (200, rights) if rights else (204, None)
        if path in ("/datasets/examinations", "/datasets/examinations/preclinical/true"):
            preclinical = path.endswith("/true")
            return self._page(caller, query, preclinical)
        parts = path.strip("/").split("/")
        if parts[:2] == ["datasets", "examinations"] and len(parts) == 3 and parts[2].isdigit():
            exam = self._exam(int(parts[2]))
            if exam is None:
                return 404, {"message": "not found"}
            if not self.allowed(caller, exam, "CAN_SEE_ALL"):
                return 403, {"message": "Access Denied"}
            return 200, self.examination_dto(exam)
        if parts[:3] == ["datasets", "datasetacquisition", "examination"] and len(parts) == 4:
            exam = self._exam(int(parts[3])) if parts[3].isdigit() else None
            if exam is None:
                return 204, None
            if not self.allowed(caller, exam, "CAN_SEE_ALL"):
                return 403, {"message": "Access Denied"}
            found = [
                self._acquisition_dto(a) for a in self.acquisitions if a.examination_id == exam.id
            ]
            return (200, found) if found else (204, None)
        if parts[:2] == ["datasets", "datasetacquisition"] and len(parts) == 3:
            acquisition = next((a for a in self.acquisitions if str(a.id) == parts[2]), None)
            exam = self._exam(acquisition.examination_id) if acquisition else None
            if acquisition is None or exam is None:
                return 404, {"message": "not found"}
            if not self.allowed(caller, exam, "CAN_SEE_ALL"):
                return 403, {"message": "Access Denied"}
            return 200, {
                **self._acquisition_dto(acquisition),
                "examination": self.examination_dto(exam),
            }
        return 404, {"message": "not found"}

    def store(self, caller: Caller, content_type: str, body: bytes) -> tuple[int, Any]:
        """``POST /datasets/dicomweb/studies``, as Shanoir's STOW filter does it: every part
        application/dicom; the examination from the public study UID (``ROOT.<examId>``), else
        from the real one; CAN_IMPORT on it; the study UID replaced with the real one and the
        patient fields with the subject's name; stored in the PACS; an empty 200."""
        if not content_type.startswith("multipart/related"):
            return 415, {"message": "not multipart/related"}
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + body)
        for part in message.iter_parts():
            if part.get_content_type() != "application/dicom":
                return 500, {"message": "only application/dicom"}
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            dataset = pydicom.dcmread(io.BytesIO(payload))
            uid = str(dataset.StudyInstanceUID)
            if uid.startswith(ROOT + "."):
                exam = self._exam(int(uid[len(ROOT) + 1 :]))
            else:
                exam = next((e for e in self.examinations if e.study_instance_uid == uid), None)
            if exam is None or exam.study_instance_uid is None:
                return 500, {"message": "no examination"}
            if not self.allowed(caller, exam, "CAN_IMPORT"):
                return 403, {"message": "Access Denied"}
            self.uploads.append((caller.user_id, copy.deepcopy(dataset)))
            dataset.StudyInstanceUID = exam.study_instance_uid
            dataset.PatientName = dataset.PatientID = exam.subject_name
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            stored = httpx.post(f"{self.pacs}/instances", content=buffer.getvalue(), timeout=30)
            if stored.status_code != 200:
                return 500, {"message": "the PACS refused"}
        return 200, None

    def _exam(self, exam_id: int) -> Examination | None:
        return next((e for e in self.examinations if e.id == exam_id), None)

    def _studies(self, caller: Caller) -> tuple[int, Any]:
        found = []
        for study in self.studies:
            if caller.admin:
                rows = study.members
            else:
                row = self._row(study, caller.user_id)
                if row is None or not row.confirmed or "CAN_SEE_ALL" not in row.rights:
                    continue
                rows = [row]
            found.append(
                {
                    "id": study.id,
                    "name": study.name,
                    "studyUserList": [
                        {
                            "userId": m.user_id,
                            "studyId": study.id,
                            "studyUserRights": list(m.rights),
                            "confirmed": m.confirmed,
                            "centerIds": list(m.center_ids),
                        }
                        for m in rows
                    ],
                }
            )
        return (200, found) if found else (204, None)

    def _page(self, caller: Caller, query: dict[str, str], preclinical: bool) -> tuple[int, Any]:
        size = min(int(query.get("size", "20")), 2000)
        number = int(query.get("page", "0"))
        exams = [
            e
            for e in sorted(self.examinations, key=lambda e: e.id)
            if e.preclinical == preclinical and self.allowed(caller, e, "CAN_SEE_ALL")
        ]
        field_, text = query.get("searchField"), query.get("searchStr")
        if field_ and text:  # Shanoir matches with LIKE: a substring
            exams = [e for e in exams if text in str(self.examination_dto(e).get(field_) or "")]
        if not exams:
            return 204, None
        content = exams[number * size : (number + 1) * size]
        return 200, {
            "number": number,
            "numberOfElements": len(content),
            "totalElements": len(exams),
            "totalPages": (len(exams) + size - 1) // size,
            "size": size,
            "content": [self.examination_dto(e) for e in content],
        }

    @staticmethod
    def examination_dto(exam: Examination) -> dict[str, Any]:
        return {
            "id": exam.id,
            "studyId": exam.study_id,
            "centerId": exam.center_id,
            "subject": {"id": exam.subject_id, "name": exam.subject_name},
            "studyInstanceUID": exam.study_instance_uid,
            "examinationDate": "2024-03-04",
            "comment": f"examination {exam.id}",
            "preclinical": exam.preclinical,
            "source": exam.source,
            "copies": list(exam.copies),
        }

    def _acquisition_dto(self, acquisition: Acquisition) -> dict[str, Any]:
        exam = self._exam(acquisition.examination_id)
        return {
            "id": acquisition.id,
            "name": acquisition.name,
            "type": "Mr",
            "studyId": exam.study_id if exam else None,
            "examinationId": acquisition.examination_id,
            "sortingIndex": acquisition.sorting_index,
        }


class ShanoirServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, world: ShanoirWorld) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.world = world

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{BASE}"


class _Handler(BaseHTTPRequestHandler):
    server: ShanoirServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        world = self.server.world
        split = urlsplit(self.path)
        caller = world.caller(self.headers.get("authorization"))
        with world.lock:
            world.calls.append(("GET", self.path, caller.user_id if caller else None))
        if world.delay:
            time.sleep(world.delay)
        if world.down:
            return self._send(500, {"message": "Internal Server Error", "trace": "java.lang..."})
        if not split.path.startswith(BASE + "/"):
            return self._send(404, {"message": "not found"})
        if split.path in (f"{BASE}/studies/api-docs", f"{BASE}/datasets/api-docs"):
            return self._send(200, {"openapi": "3.0.1", "info": {"title": split.path}})
        if caller is None:
            return self._send(401, {"message": "Unauthorized"})
        if self.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self._send(415, {"message": "Content type '' not supported"})
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with world.lock:
            status, body = world.answer(caller, split.path[len(BASE) :], query)
        self._send(status, body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        world = self.server.world
        caller = world.caller(self.headers.get("authorization"))
        with world.lock:
            world.calls.append(("POST", self.path, caller.user_id if caller else None))
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != f"{BASE}/datasets/dicomweb/studies":
            return self._send(404, {"message": "not found"})
        if caller is None:
            return self._send(401, {"message": "Unauthorized"})
        if not caller.roles & _USER_ROLES:
            return self._send(403, {"message": "Access Denied"})
        status, answer = world.store(caller, self.headers.get("content-type", ""), body)
        self._send(status, answer if status != 200 else None, empty=status == 200)

    def _send(self, status: int, body: Any, *, empty: bool = False) -> None:
        content = b"" if status == 204 or empty else json.dumps(body).encode()
        self.send_response(status)
        if content:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serving(world: ShanoirWorld) -> contextlib.AbstractContextManager[ShanoirServer]:
    """``world`` served at ``server.url`` (Shanoir's ``/shanoir-ng`` base) until the block ends."""
    return running(ShanoirServer(world))
