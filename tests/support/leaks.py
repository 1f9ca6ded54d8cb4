"""What the randomized leak tests share: the archive as a test knows it, random routes of the
Studies Service, and one example's requests, every byte of whose answers is scanned for a UID
the caller may not see (``test_access_leaks*.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
from hypothesis import strategies as st

from shanoir_dicomweb_proxy import Action, UidFormatter

from .dicomweb import DICOM, OCTET, XML

JSON = "application/dicom+json"
SEARCH_XML = "application/dicom+xml"
BASE = "http://proxy.test/dicomweb"
GHOST = 88888  # granted to the tester, but there is no such examination
MADE_UP = 99999  # granted to nobody, and there is no such examination
STUDY = "<study>"  # where a route's study UID goes in its path
SERIES = "<series>"
INSTANCE = "<instance>"
NO_INSTANCE = "1.2.3.999999999"  # the UID of no instance
DEFLATED = b"1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class Series:
    public: str
    real: str
    instances: tuple[str, ...]


@dataclass(frozen=True)
class Exam:
    exam_id: int
    public: str
    real: str
    series: tuple[Series, ...]


class World:
    """The proxy in process, its policy, and the archive as the test knows it.

    Not a dataclass: hypothesis pretty-prints the arguments of a failing example, a dataclass
    field by field, and printing this one broke its replay (FlakyStrategyDefinition).
    """

    def __init__(
        self,
        runner: asyncio.Runner,
        client: httpx.AsyncClient,
        formatter: UidFormatter,
        exams: dict[int, Exam],
        tokens: tuple[str, ...],
        real_uids: frozenset[str],
    ) -> None:
        self.runner = runner
        self.client = client
        self.formatter = formatter
        self.exams = exams
        self.tokens = tokens
        self.real_uids = real_uids
        #: A public series UID of no series.
        self.no_series = formatter.series_uid(MADE_UP)
        self.patterns: dict[frozenset[int], re.Pattern[bytes]] = {}
        #: UIDs a client might send as search keys: public, real, unknown.
        ghosts = [formatter.study_uid(GHOST), formatter.study_uid(MADE_UP)]
        self.study_pool = [u for e in exams.values() for u in (e.public, e.real)] + ghosts
        self.series_pool = [u for e in exams.values() for s in e.series for u in (s.public, s.real)]
        self.instance_pool = [i for e in exams.values() for s in e.series for i in s.instances]
        #: What each UID that may be forbidden is, for failure messages.
        self.names: dict[str, str] = {}
        for exam in exams.values():
            what = f"of examination {exam.exam_id}"
            self.names[exam.real] = f"the real study UID {what}"
            self.names[exam.public] = f"the public study UID {what}"
            for series in exam.series:
                self.names[series.real] = f"the real UID of a series {what}"
                self.names[series.public] = f"the public UID of a series {what}"
                self.names.update((i, f"the SOP Instance UID of an instance {what}")
                                  for i in series.instances)  # fmt: skip

    def __repr__(self) -> str:
        return f"<World: {len(self.exams)} examinations>"

    def forbidden(self, readable: frozenset[int]) -> re.Pattern[bytes]:
        """Every real study and series UID, and the public UIDs and SOP Instance UIDs of the
        examinations not in ``readable``, as whole UIDs (not the prefix of a longer one). An
        instance a readable examination holds too (a copy's) is not forbidden."""
        if readable not in self.patterns:
            uids = set(self.real_uids)
            for exam in self.exams.values():
                if exam.exam_id not in readable:
                    uids.add(exam.public)
                    for series in exam.series:
                        uids.add(series.public)
                        uids.update(series.instances)
            uids -= {
                instance
                for exam in self.exams.values()
                if exam.exam_id in readable
                for series in exam.series
                for instance in series.instances
            }
            alternatives = "|".join(re.escape(u) for u in sorted(uids, key=len, reverse=True))
            pattern = rf"(?<![0-9.])(?:{alternatives})(?![0-9]|\.[0-9])"
            self.patterns[readable] = re.compile(pattern.encode())
        return self.patterns[readable]


Kind = Literal["search", "metadata", "retrieve", "frames", "rendered", "thumbnail", "bulk", "link"]


@dataclass(frozen=True)
class Route:
    """One request: ``path`` (below the DICOMweb base) holds :data:`STUDY` where ``study``
    goes, :data:`SERIES` and :data:`INSTANCE` where ``series`` and ``instance`` go.

    ``exam`` is the examination ``study`` names when it is a public study UID. ``mismatch``
    names what of the path is not of its parent: a series not of the examination, or an
    instance not of the series.
    """

    kind: Kind
    path: str
    accept: str = JSON
    study: str | None = None
    exam: int | None = None
    series: str | None = None
    instance: str | None = None
    mismatch: Literal["", "series", "instance"] = ""
    query: tuple[tuple[str, str], ...] = ()
    action: Action = "read"

    @property
    def url(self) -> str:
        url = self.path
        for mark, value in ((STUDY, self.study), (SERIES, self.series), (INSTANCE, self.instance)):
            url = url.replace(mark, value) if value is not None else url
        return url

    def __str__(self) -> str:
        query = "?" + urlencode(self.query) if self.query else ""
        return f"GET {self.url}{query} (Accept: {self.accept})"


def level_of(path: str) -> str:
    return path.rsplit("/", 1)[-1]


@st.composite
def random_query(draw: st.DrawFn, world: World, level: str) -> tuple[tuple[str, str], ...]:
    """Search keys: UID lists that mix granted, foreign, real and unknown UIDs; paging."""
    query: list[tuple[str, str]] = []

    def uid_list(pool: list[str]) -> str:
        uids = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
        return draw(st.sampled_from([",", "\\"])).join(uids)

    if draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(["StudyInstanceUID", "0020000D", "0020000d"]))
        query.append((key, uid_list(world.study_pool)))
    if level != "studies" and draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(["SeriesInstanceUID", "0020000E"]))
        query.append((key, uid_list(world.series_pool)))
    if level == "instances" and draw(st.integers(0, 3)) == 0:
        query.append(("SOPInstanceUID", uid_list(world.instance_pool)))
    if draw(st.integers(0, 4)) == 0:
        query.append(("includefield", "all"))
    for key in ("limit", "offset"):
        if draw(st.integers(0, 3)) == 0:
            query.append((key, str(draw(st.integers(0, 6)))))
    return tuple(query)


@st.composite
def random_route(draw: st.DrawFn, world: World, readable: list[int]) -> Route:
    """A search at the root, or any route below a study: of a granted examination or not, with
    a series and an instance of that examination or of another, by public or real UID."""
    ids = sorted(world.exams)
    if draw(st.integers(0, 4)) == 0:  # a search at the root
        level = draw(st.sampled_from(["studies", "series", "instances"]))
        accept = draw(st.sampled_from([JSON, JSON, JSON, SEARCH_XML]))
        return Route("search", "/" + level, accept, query=draw(random_query(world, level)))
    favoured = ids
    if draw(st.integers(0, 2)) and readable:  # mostly a readable one, when there is one
        favoured = readable
    exam = world.exams[draw(st.sampled_from(favoured))]
    form = draw(st.sampled_from(["public"] * 6 + ["real", "ghost"]))
    study, exam_id = {
        "public": (exam.public, exam.exam_id),
        "real": (exam.real, None),
        "ghost": (world.formatter.study_uid(GHOST), GHOST),
    }[form]
    # The series: mostly of the examination, else of another one; by public or real UID.
    others = [e for e in ids if e != exam.exam_id]
    source = exam if draw(st.integers(0, 3)) else world.exams[draw(st.sampled_from(others))]
    series = draw(st.sampled_from(source.series))
    by_real = draw(st.integers(0, 5)) == 0
    series_segment = series.real if by_real else series.public
    series_foreign = source is not exam or by_real
    # The instance: of that series, of another series of its examination, or of another
    # examination.
    whose = draw(st.sampled_from(["series"] * 3 + ["exam"] + ["other"] * 3))
    instance_exam = source
    if whose == "series":
        instance = draw(st.sampled_from(series.instances))
    else:
        if whose == "other":
            instance_exam = world.exams[draw(st.sampled_from(others))]
        holder = draw(st.sampled_from(instance_exam.series))
        instance = draw(st.sampled_from(holder.instances))
    instance_foreign = instance not in series.instances

    s = f"/studies/{STUDY}"
    se = f"{s}/series/{SERIES}"
    i = f"{se}/instances/{INSTANCE}"
    level = draw(st.sampled_from(["study", "series", "instance", "instance"]))
    mismatch: Literal["", "series", "instance"] = ""
    if level != "study" and series_foreign:
        mismatch = "series"
    elif level == "instance" and instance_foreign:
        mismatch = "instance"

    def to(kind: Kind, path: str, accept: str = JSON, action: Action = "read") -> Route:
        return Route(
            kind, path, accept, study, exam_id, series_segment, instance, mismatch, action=action
        )

    if level == "study":
        choices = [
            to("search", s + "/series"),
            to("search", s + "/instances"),
            to("search", s + "/series", SEARCH_XML),
            to("metadata", s + "/metadata"),
            to("metadata", s + "/metadata", XML),
            to("retrieve", s, DICOM, "download"),
            to("rendered", s + "/rendered", "image/jpeg"),
            to("thumbnail", s + "/thumbnail", "image/jpeg"),
        ]
    elif level == "series":
        choices = [
            to("search", se + "/instances"),
            to("metadata", se + "/metadata"),
            to("metadata", se + "/metadata", XML),
            to("retrieve", se, DICOM, "download"),
            to("rendered", se + "/rendered", "image/jpeg"),
            to("thumbnail", se + "/thumbnail", "image/jpeg"),
        ]
    else:
        choices = [
            to("metadata", i + "/metadata"),
            to("metadata", i + "/metadata", XML),
            to("retrieve", i, DICOM, "download"),
            to("frames", i + "/frames/1", OCTET),
            to("rendered", i + "/frames/1/rendered", "image/jpeg"),
            to("rendered", i + "/rendered", "image/png"),
            to("thumbnail", i + "/thumbnail", "image/jpeg"),
            to("bulk", i + "/bulk/7fe00010", OCTET),
        ]
    chosen = draw(st.sampled_from(choices))
    if chosen.kind == "search":
        chosen = replace(chosen, query=draw(random_query(world, level_of(chosen.path))))
    return chosen


def _linkroute(url: str, formatter: UidFormatter) -> Route:
    """The route of a link found in an answer: a RetrieveURL or a BulkDataURI."""
    assert url.startswith(BASE + "/studies/"), url
    path = url[len(BASE) :]
    study = path.split("/")[2]
    template = path.replace(f"/studies/{study}", f"/studies/{STUDY}", 1)
    bulk = "/bulk/" in path or "/bulkdata/" in path
    exam = formatter.exam_id(study)
    if bulk:
        return Route("link", template, OCTET, study=study, exam=exam, action="read")
    return Route("link", template, DICOM, study=study, exam=exam, action="download")


def links_in(value: Any) -> Iterator[str]:
    """RetrieveURL values and BulkDataURIs at every depth of DICOM JSON."""
    if isinstance(value, list):
        for item in value:
            yield from links_in(item)
    elif isinstance(value, dict):
        for tag, element in value.items():
            if not isinstance(element, dict):
                continue
            if isinstance(element.get("BulkDataURI"), str):
                yield element["BulkDataURI"]
            if tag == "00081190":
                yield from (v for v in element.get("Value", []) if isinstance(v, str))
            if element.get("vr") == "SQ":
                yield from links_in(element.get("Value", []))


def inflated(body: bytes) -> Iterator[bytes]:
    """The dataset of every deflated Part 10 file in ``body``, inflated."""
    start = 0
    while (at := body.find(b"DICM", start)) != -1:
        start = at + 4
        meta = at + 4
        if body[meta : meta + 6] != b"\x02\x00\x00\x00UL":
            continue
        end = meta + 12 + int.from_bytes(body[meta + 8 : meta + 12], "little")
        if DEFLATED in body[meta:end]:
            try:
                yield zlib.decompressobj(-zlib.MAX_WBITS).decompress(body[end:])
            except zlib.error:
                pass


# --- one example -------------------------------------------------------------------------------


@contextlib.contextmanager
def in_process(app: Any) -> Iterator[tuple[asyncio.Runner, httpx.AsyncClient]]:
    """``app`` entered (what the ASGI lifespan does; ASGITransport runs none) on an event loop
    of its own (not the tests' loop), and a client of it, until the block ends."""
    runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
    runner.run(app.__aenter__())
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url=BASE,
        headers={"Accept-Encoding": "identity"},
        timeout=60,
    )
    try:
        yield runner, client
    finally:
        runner.run(client.aclose())
        runner.run(app.__aexit__(None, None, None))
        runner.close()


#: Whether the tester may ``action`` an examination (None: a study that names none).
Rule = Callable[[int | None, Action], bool]


class Example:
    """The requests of one example, as the tester with ``token``, who may do what ``may``
    says; a search at the root with no key lists exactly ``listed``."""

    def __init__(self, world: World, token: str, may: Rule, listed: frozenset[int]) -> None:
        self.world = world
        self.token = token
        self.may = may
        self.readable = frozenset(e for e in world.exams if may(e, "read"))
        self.listed = listed
        self.pattern = world.forbidden(self.readable)
        self.links: set[str] = set()
        self.references: dict[tuple[str, str, tuple[tuple[str, str], ...]], httpx.Response] = {}

    async def get(self, route: Route) -> httpx.Response:
        headers = {"Accept": route.accept, "Authorization": f"Bearer {self.token}"}
        response = await self.world.client.get(route.url, params=route.query, headers=headers)
        assert response.headers.get("content-encoding", "identity") == "identity", route
        head = b"\r\n".join(name + b": " + value for name, value in response.headers.raw)
        for blob in (head, response.content, *inflated(response.content)):
            hit = self.pattern.search(blob)
            if hit is not None:
                uid = hit.group().decode()
                where = "headers" if blob is head else "body"
                raise AssertionError(
                    f"{route} answered {response.status_code} with {uid} in its {where}: "
                    f"{self.world.names.get(uid, uid)}; the caller may read only "
                    f"{sorted(self.readable)}"
                )
        return response

    async def reference(self, made_up: Route) -> httpx.Response:
        """The answer to a route on something that does not exist."""
        key = made_up.url, made_up.accept, made_up.query
        if key not in self.references:
            self.references[key] = await self.get(made_up)
        return self.references[key]

    async def same_as(self, response: httpx.Response, made_up: Route, what: str) -> None:
        """``response`` is a 404 that says nothing ``made_up``'s answer does not."""
        reference = await self.reference(made_up)
        assert reference.status_code == 404, (str(made_up), reference.text)
        seen = response.status_code, headers_of(response), response.content
        expected = 404, headers_of(reference), reference.content
        assert seen == expected, f"{what}: not answered as {made_up}"

    async def check(self, route: Route) -> None:
        response = await self.get(route)
        status = response.status_code
        assert status != 500, (str(route), response.text)
        if route.study is not None and not self.may(route.exam, route.action):
            made_up = replace(route, study=self.world.formatter.study_uid(MADE_UP), exam=MADE_UP)
            await self.same_as(response, made_up, f"{route}, denied")
            return
        if route.mismatch == "series":
            no_series = replace(route, series=self.world.no_series)
            await self.same_as(response, no_series, f"{route}, mismatched")
            return
        if route.mismatch == "instance":
            made_up = replace(route, instance=NO_INSTANCE)
            await self.same_as(response, made_up, f"{route}, mismatched")
            return
        if route.kind == "search":
            assert status in ((200, 204) if route.accept == SEARCH_XML else (200,)), str(route)
        elif route.kind == "metadata":
            assert status == 200, (str(route), response.text)
        elif route.kind == "link" and route.action == "read":
            assert status == 200, (str(route), response.text)
        if status == 200 and response.headers["content-type"].startswith(JSON):
            body = response.json()
            if route.kind == "search":
                self.check_rows(route, body)
            self.links.update(links_in(body))

    def check_rows(self, route: Route, rows: list[dict[str, Any]]) -> None:
        assert isinstance(rows, list), str(route)
        exams: set[int | None] = set()
        for row in rows:
            study = row["0020000D"]["Value"][0]
            assert route.study is None or study == route.study, (str(route), study)
            exams.add(self.world.formatter.exam_id(study))
        assert exams <= self.readable, (str(route), sorted(map(str, exams)))
        asked = {
            self.world.formatter.exam_id(uid)
            for key, value in route.query
            if key.lower() in ("studyinstanceuid", "0020000d")
            for uid in re.split(r"[,\\]", value)
        }
        if asked and route.study is None:  # below a study, the path's study is the scope
            assert exams <= asked, (str(route), sorted(map(str, exams)))
        if route.path == "/studies" and not route.query:
            assert exams == self.listed, (str(route), sorted(map(str, exams)))

    async def run(self, routes: list[Route], links: list[int]) -> None:
        await self.check(Route("search", "/studies"))  # every example reads the whole list
        for route in routes:
            await self.check(route)
        found = sorted(self.links)
        for pick in sorted({found[n % len(found)] for n in links} if found else ()):
            await self.check(_linkroute(pick, self.world.formatter))


def headers_of(response: httpx.Response) -> list[tuple[str, str]]:
    """The headers of an answer, but its request id (a fresh one each time)."""
    return [(k, v) for k, v in response.headers.multi_items() if k != "x-request-id"]
