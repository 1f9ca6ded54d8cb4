"""A soak: viewer-like load through the full stack for minutes, sampled every few seconds.

    python bench/soak.py [--minutes 30] [--clients 16] [--interval 10] [--json FILE]

Issue 19. A fresh Orthanc holds the samples' small studies, the bench series (40 x 0.5 MB MR)
and one study that uploads go to; a store synced from it maps every study and series to public
UIDs; the proxy runs as users run it (``serve -c FILE``: auth on a local JWKS, the sqlite
mapping and access policy, aiohttp upstream). Three users: ``alice`` reads everything and
writes into the upload study, ``bob`` reads half the studies, ``carol`` the bench study and
three others. ``--clients`` clients (8-32) loop over a viewer's requests (searches at three
levels, series metadata, frames, rendered images, series retrieves, small STOW uploads, a study
the user may not see); a quarter of them hang up in the middle of some retrieves, two read
retrieves slowly.

Every ``--interval`` seconds: the proxy's RSS, open descriptors, client and upstream
connections, requests, latency p50/p99 and errors. After the load stops: what the proxy still
holds. Pass: RSS and descriptors flat (the end within 10 % of the 5-minute mark, or of the
first sample past the warm-up in shorter runs), no 5xx, no error, no truncated answer, every
client connection gone and descriptors back to idle within 2 s of the end. It prints figures
and exits 0 once it has measured (a FAIL is a figure to act on); ``--strict`` exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT_DIR))

from tests.support.sockets import (  # noqa: E402
    open_descriptors,
    process_sockets,
    server_connections,
)

from _clients import percentile  # noqa: E402
from _data import prepare  # noqa: E402
from _servers import tune_env  # noqa: E402
from access import Bench, _Spec, _sync, _uid, _upload, _Writer  # noqa: E402
from run import ORTHANC_MALLOC, _environ, _public_uids, in_workdir  # noqa: E402
from shanoir_dicomweb_proxy import Settings  # noqa: E402
from shanoir_dicomweb_proxy._auth import dev_token  # noqa: E402
from shanoir_dicomweb_proxy._store import SqliteStore  # noqa: E402
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, resident_memory  # noqa: E402

JSON = "application/dicom+json"
DICOM = 'multipart/related; type="application/dicom"'
FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
BOUNDARY = "soak-stow-boundary"
MB = 1024 * 1024
FLAT = 0.10  # the end within 10 % of the reference sample
FIVE_MINUTES = 300.0
SLOW_READERS = 2
SLOW_RATE = 2 * MB  # bytes/s of a slow reader
UPLOAD_SERIES = 1  # the upload study's one series, loaded directly first


# -- the archive and the stack --------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    study: str  # public UIDs
    series: str
    instances: tuple[str, ...]
    images: bool  # frames and rendered images make sense
    exam: int
    big: bool = False  # the bench series (21 MB)


@dataclass
class Stack:
    orthanc: OrthancServer
    proxy: ProxyServer
    series: list[Series]
    tokens: dict[str, str]
    visible: dict[str, set[int]]  # user → examinations
    upload_study: str  # public
    upload_series: str
    upload_exam: int


def _catalogue(store: Path, cache: Path) -> tuple[list[Series], dict[str, str]]:
    data = prepare(cache)
    public = _public_uids(store)
    exam_of = {uid: int(p.rsplit(".", 1)[1]) for uid, p in public.items()}
    found: list[Series] = []
    for study in data.samples.small_studies:
        for series in study.series:
            found.append(
                Series(
                    public[study.uid],
                    public[series.uid],
                    series.instances,
                    series.modality in ("MR", "CT"),
                    exam_of[study.uid],
                )
            )
    bench = data.series
    found.append(
        Series(
            public[bench.study_uid],
            public[bench.series_uid],
            bench.instance_uids,
            True,
            exam_of[bench.study_uid],
            big=True,
        )
    )
    return found, public


def _setup(
    stack: contextlib.ExitStack,
    workdir: Path,
    cache: Path,
    ttl: int,
    env: dict[str, str] | None = None,
    upstream: dict[str, Any] | None = None,
) -> Stack:
    log = Bench(argparse.Namespace(client="httpx"))
    data = prepare(cache)
    orthanc = OrthancServer(workdir / "orthanc")
    stack.callback(orthanc.stop)
    with _environ(ORTHANC_MALLOC):  # as bench/run.py: Orthanc keeps its heap
        orthanc.start()
    small = [p for p in data.samples.files if p != data.samples.large.path]
    loaded = orthanc.load([*small, *data.series.files])
    study, series = _uid("soak", "study"), _uid("soak", "series")
    seed = _Spec(study, series, _uid("soak", "instance", 0), "SOAK", "20240101", "SOAK", 1, 1)
    asyncio.run(_upload(orthanc.url, [seed], 1))
    store = workdir / "store.sqlite3"
    _sync(orthanc, store)
    catalogue, public = _catalogue(store, cache)
    upload_exam = int(public[study].rsplit(".", 1)[1])
    exams = sorted({s.exam for s in catalogue})
    bench_exam = next(s.exam for s in catalogue if s.big)
    visible = {
        "alice": set(exams) | {upload_exam},
        "bob": set(exams[::2]),
        "carol": {bench_exam, *exams[:3]},
    }
    with SqliteStore(store) as opened:
        for user, granted in visible.items():
            for exam in granted:
                opened.grant(user, exam, "read")
        opened.grant("alice", upload_exam, "write")
    proxy = log._proxy(stack, workdir, orthanc, store, env=env, upstream=upstream)
    config = Settings.from_toml(proxy.config_path)
    tokens = {
        user: dev_token(config, user, {"userId": user}, ttl=ttl)
        for user in ("alice", "bob", "carol")
    }
    log.log(f"{loaded} instances in Orthanc ({orthanc.url}); proxy on {proxy.url}")
    return Stack(
        orthanc,
        proxy,
        catalogue,
        tokens,
        visible,
        public[study],
        public[series],
        upload_exam,
    )


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Window:
    """What happened between two samples."""

    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    hangups: int = 0
    truncated: int = 0
    bytes: int = 0


class Load:
    """The clients and what they saw, window by window."""

    def __init__(self, stack: Stack, clients: int, seed: int) -> None:
        self.stack = stack
        self.clients = clients
        self.random = random.Random(seed)
        self.window = Window()
        self.total = Window()
        self.writer = _Writer()
        self.stopping = asyncio.Event()
        self.operations: collections.Counter[str] = collections.Counter()

    def take(self) -> Window:
        window, self.window = self.window, Window()
        return window

    def _note(self, what: str, status: int, seconds: float, size: int) -> None:
        self.operations[what] += 1
        for window in (self.window, self.total):
            window.statuses[status] += 1
            window.latencies.append(seconds) if window is self.window else None
            window.bytes += size

    def _error(self, what: str, kind: str) -> None:
        for window in (self.window, self.total):
            window.errors[f"{what}: {kind}"] += 1

    async def run(self, seconds: float) -> None:
        users = list(self.stack.tokens)
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        timeout = httpx.Timeout(120, connect=10)

        async def client(number: int) -> None:
            user = users[number % len(users)]
            headers = {"Authorization": f"Bearer {self.stack.tokens[user]}"}
            headers["Accept-Encoding"] = "identity"
            rng = random.Random(self.random.random())
            slow = number < SLOW_READERS
            hangs = number % 4 == 3
            async with httpx.AsyncClient(
                base_url=self.stack.proxy.dicomweb_url,
                headers=headers,
                limits=limits,
                timeout=timeout,
                trust_env=False,
            ) as http:
                while not self.stopping.is_set():
                    await self._one(http, user, rng, slow=slow, hangs=hangs)

        async def stop() -> None:  # after ``seconds``, or earlier when told to
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), seconds)
            self.stopping.set()

        await asyncio.gather(stop(), *(client(n) for n in range(self.clients)))

    async def _one(
        self, http: httpx.AsyncClient, user: str, rng: random.Random, *, slow: bool, hangs: bool
    ) -> None:
        visible = [s for s in self.stack.series if s.exam in self.stack.visible[user]]
        hidden = [s for s in self.stack.series if s.exam not in self.stack.visible[user]]
        series = rng.choice(visible)
        images = [s for s in visible if s.images]
        image = rng.choice(images)
        instance = rng.choice(image.instances)
        base = f"/studies/{series.study}/series/{series.series}"
        if slow:
            await self._retrieve(http, "slow retrieve", base, rng, hang=False, rate=SLOW_RATE)
            return
        kinds = [
            ("search studies", 20),
            ("search series", 10),
            ("search instances", 10),
            ("series metadata", 15),
            ("frame", 30),
            ("rendered", 8),
            ("retrieve", 12 if hangs else 4),
            ("denied", 3 if hidden else 0),
            ("stow", 2 if user == "alice" else 0),
        ]
        what = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        image_base = f"/studies/{image.study}/series/{image.series}/instances/{instance}"
        if what == "search studies":
            await self._get(http, what, "/studies?limit=10&includefield=00081030,00080061", JSON)
        elif what == "search series":
            await self._get(http, what, f"/studies/{series.study}/series", JSON)
        elif what == "search instances":
            await self._get(http, what, base + "/instances", JSON)
        elif what == "series metadata":
            await self._get(http, what, base + "/metadata", JSON)
        elif what == "frame":
            await self._get(http, what, image_base + "/frames/1", FRAMES)
        elif what == "rendered":
            await self._get(http, what, image_base + "/rendered", "image/jpeg")
        elif what == "retrieve":
            if series.big and rng.random() < 0.75:
                series = rng.choice([s for s in visible if not s.big])
                base = f"/studies/{series.study}/series/{series.series}"
            hang = hangs
            await self._retrieve(http, what, base, rng, hang=hang)
        elif what == "denied":
            other = rng.choice(hidden)
            await self._get(http, what, f"/studies/{other.study}/series", JSON, expect=404)
        else:
            await self._stow(http, rng)

    async def _get(
        self, http: httpx.AsyncClient, what: str, path: str, accept: str, expect: int = 200
    ) -> None:
        started = time.perf_counter()
        try:
            response = await http.get(path, headers={"Accept": accept})
        except httpx.HTTPError as exc:
            self._error(what, type(exc).__name__)
            return
        self._note(what, response.status_code, time.perf_counter() - started, len(response.content))
        if response.status_code != expect:
            self._error(what, f"status {response.status_code} (expected {expect})")

    async def _retrieve(
        self,
        http: httpx.AsyncClient,
        what: str,
        path: str,
        rng: random.Random,
        *,
        hang: bool,
        rate: float | None = None,
    ) -> None:
        started = time.perf_counter()
        size = 0
        tail = b""
        try:
            async with http.stream("GET", path, headers={"Accept": DICOM}) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._note(what, response.status_code, time.perf_counter() - started, 0)
                    self._error(what, f"status {response.status_code}")
                    return
                boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
                stop_at = rng.randint(1, 4) if hang else None
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    tail = (tail + chunk[-256:])[-256:]
                    if stop_at is not None:
                        stop_at -= 1
                        if stop_at == 0:
                            for window in (self.window, self.total):
                                window.hangups += 1
                            self.operations[what + " hung up"] += 1
                            return  # leaving the block closes the connection mid-body
                    if rate is not None:
                        await asyncio.sleep(len(chunk) / rate)
        except httpx.HTTPError as exc:
            self._error(what, type(exc).__name__)
            return
        self._note(what, 200, time.perf_counter() - started, size)
        if f"--{boundary}--".encode() not in tail:
            for window in (self.window, self.total):
                window.truncated += 1

    async def _stow(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        stack = self.stack
        sop = _uid("soak", "upload", rng.random())
        spec = _Spec(stack.upload_study, stack.upload_series, sop, "SOAK", "20240101", "SOAK", 1, 2)
        part = self.writer(spec)
        body = (
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + part
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": JSON,
        }
        started = time.perf_counter()
        try:
            response = await http.post(
                f"/studies/{stack.upload_study}", content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            self._error("stow", type(exc).__name__)
            return
        self._note("stow", response.status_code, time.perf_counter() - started, len(body))
        if response.status_code != 200:
            self._error("stow", f"status {response.status_code}{_failure_reasons(response)}")


def _failure_reasons(response: httpx.Response) -> str:
    """The FailureReasons (0008,1197) of a STOW answer's FailedSOPSequence, as text."""
    try:
        failed = response.json().get("00081198", {}).get("Value", [])
        reasons = sorted({hex(i["00081197"]["Value"][0]) for i in failed if "00081197" in i})
    except (ValueError, AttributeError, KeyError, IndexError, TypeError):
        return ": " + response.text[:120]
    return f", FailureReason {', '.join(reasons)}" if reasons else ""


# -- sampling ---------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss_mb: float
    fds: int
    client_connections: int
    upstream_connections: int
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int
    status_5xx: int
    hangups: int


def _held(stack: Stack) -> tuple[int, int, int]:
    """The proxy's descriptors, client connections and upstream connections now."""
    pid = stack.proxy.pid
    fds = open_descriptors(pid)["total"]
    clients = len(server_connections(stack.proxy.port))
    upstream = sum(1 for s in process_sockets(pid) if s.remote_port == stack.orthanc.port)
    return fds, clients, upstream


def _sample(stack: Stack, at: float, window: Window) -> Sample:
    fds, clients, upstream = _held(stack)
    latencies = window.latencies
    return Sample(
        round(at, 1),
        round(resident_memory(stack.proxy.pid) / MB, 1),
        fds,
        clients,
        upstream,
        sum(window.statuses.values()),
        round(percentile(latencies, 50) * 1000, 1) if latencies else 0.0,
        round(percentile(latencies, 99) * 1000, 1) if latencies else 0.0,
        sum(window.errors.values()),
        sum(n for status, n in window.statuses.items() if status >= 500),
        window.hangups,
    )


async def _measure(
    stack: Stack, load: Load, seconds: float, interval: float, show: Callable[[Sample], None]
) -> list[Sample]:
    samples: list[Sample] = []
    started = time.monotonic()

    async def sampler() -> None:
        while not load.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(load.stopping.wait(), interval)
            sample = _sample(stack, time.monotonic() - started, load.take())
            samples.append(sample)
            show(sample)

    await asyncio.gather(load.run(seconds), sampler())
    return samples


# -- the verdict ------------------------------------------------------------------------------


@dataclass
class Verdict:
    reference: Sample | None
    end: Sample
    checks: list[tuple[str, bool, str]]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def _reference(samples: Sequence[Sample], seconds: float) -> int | None:
    """The index of the 5-minute sample, or in shorter runs of the first past a warm-up of a
    third of the run (at most a minute)."""
    mark = FIVE_MINUTES if seconds > 2 * FIVE_MINUTES else min(60.0, seconds / 3)
    return next((i for i, s in enumerate(samples) if s.at >= mark - 0.5), None)


def _level(samples: Sequence[Sample], what: str) -> float:
    """The median of ``what`` over a few samples: one sample catches whatever retrieves happen
    to be in flight (their buffers), the median the level underneath."""
    return float(statistics.median([getattr(s, what) for s in samples]))


def _flat(
    samples: Sequence[Sample], reference: int, what: str, unit: str, slack: float
) -> tuple[str, bool, str]:
    """Whether ``what`` at the end (median of the last 3 samples) is within 10 % (or
    ``slack``) of its level at ``reference`` (median of that sample and the next 2)."""
    before = samples[reference : reference + 3]
    at, end = _level(before, what), _level(samples[-3:], what)
    ok = end <= at * (1 + FLAT) or end <= at + slack
    detail = (
        f"{at:.1f} {unit} at {before[0].at:.0f}-{before[-1].at:.0f} s, {end:.1f} {unit} at "
        f"{samples[-3].at:.0f}-{samples[-1].at:.0f} s ({end / at - 1:+.1%}; medians of 3 samples)"
    )
    return f"{what} flat", ok, detail


def _verdict(
    samples: Sequence[Sample],
    seconds: float,
    load: Load,
    idle: tuple[int, int, int],
    after: tuple[int, int, int],
) -> Verdict:
    end = samples[-1]
    index = _reference(samples, seconds)
    reference = samples[index] if index is not None else None
    checks: list[tuple[str, bool, str]] = []
    if index is not None and len(samples) - index >= 6:
        checks.append(_flat(samples, index, "rss_mb", "MB", 0))
        checks.append(_flat(samples, index, "fds", "descriptors", 4))
    else:
        past = len(samples) - index if index is not None else 0
        checks.append(("flat", False, f"{past} samples past the warm-up, 6 needed"))
    total = load.total
    fives = sum(n for status, n in total.statuses.items() if status >= 500)
    checks.append(("no 5xx", fives == 0, f"{fives} answers >= 500"))
    errors = sum(total.errors.values())
    top = ", ".join(f"{k} x{n}" for k, n in total.errors.most_common(4))
    checks.append(("no error", errors == 0, f"{errors} errors" + (f" ({top})" if top else "")))
    checks.append(("no truncated answer", total.truncated == 0, f"{total.truncated} truncated"))
    fds, clients, upstream = after
    checks.append(("client connections gone", clients == 0, f"{clients} left 2 s after the load"))
    checks.append(
        (
            "descriptors back to idle",
            fds <= idle[0] + 2,
            f"{fds} open 2 s after the load, {idle[0]} before it ({upstream} upstream)",
        )
    )
    return Verdict(reference, end, checks)


def _render(
    args: argparse.Namespace,
    samples: Sequence[Sample],
    load: Load,
    verdict: Verdict,
    idle: tuple[int, int, int],
) -> list[str]:
    total = load.total
    requests = sum(total.statuses.values())
    lines = [
        f"soak: {args.minutes:g} min, {args.clients} clients ({SLOW_READERS} slow readers, "
        f"{args.clients // 4} hanging up), 3 users, load average at start "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"requests {requests} ({requests / (args.minutes * 60):.0f}/s), "
        f"{total.bytes / MB:.0f} MB, hang-ups {total.hangups}, statuses "
        + ", ".join(f"{k}: {v}" for k, v in sorted(total.statuses.items())),
        "operations: " + ", ".join(f"{k} {v}" for k, v in sorted(load.operations.items())),
        f"idle before the load: {idle[0]} descriptors",
        "",
    ]
    if verdict.reference is not None:
        lines.append(f"reference sample: {verdict.reference.at:.0f} s")
    for name, ok, detail in verdict.checks:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    lines.append(f"soak: {'PASS' if verdict.passed else 'FAIL'}")
    return lines


def _allocations(directory: Path, top: int = 15) -> list[str]:
    """What grew between the second snapshot of the proxy's allocations and the last."""
    import tracemalloc

    paths = sorted(directory.glob("*.snap"))
    if len(paths) < 3:
        return [f"tracemalloc: {len(paths)} snapshots, too few to compare"]
    first, last = (tracemalloc.Snapshot.load(str(p)) for p in (paths[1], paths[-1]))
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    first, last = first.filter_traces(skip), last.filter_traces(skip)
    lines = [f"tracemalloc: {paths[1].stem} -> {paths[-1].stem} (pid-seconds), top growth:"]
    for stat in last.compare_to(first, "traceback")[:top]:
        frames = stat.traceback.format(limit=4, most_recent_first=True)
        where = " <- ".join(f.strip() for f in frames if f.strip().startswith("File"))
        lines.append(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d}  {where}")
    totals = [sum(s.size for s in snap.statistics("filename")) for snap in (first, last)]
    lines.append(f"  traced total {totals[0] / MB:.1f} MB -> {totals[1] / MB:.1f} MB")
    return lines


def _header() -> str:
    return (
        f"{'t s':>6} {'RSS MB':>7} {'fds':>4} {'conns':>5} {'upstr':>5} {'req':>5} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'5xx':>4} {'hang':>4}"
    )


def _line(s: Sample) -> str:
    return (
        f"{s.at:6.0f} {s.rss_mb:7.1f} {s.fds:4d} {s.client_connections:5d} "
        f"{s.upstream_connections:5d} {s.requests:5d} {s.p50_ms:7.1f} {s.p99_ms:7.1f} "
        f"{s.errors:4d} {s.status_5xx:4d} {s.hangups:4d}"
    )


def run(
    args: argparse.Namespace, stack_: contextlib.ExitStack, workdir: Path
) -> tuple[list[str], dict[str, Any]]:
    seconds = args.minutes * 60
    env = None
    snapshots = workdir / "tracemalloc"
    if args.tracemalloc:
        snapshots.mkdir()
        env = tune_env(
            {"BENCH_TRACEMALLOC": str(snapshots), "BENCH_TRACEMALLOC_EVERY": str(args.tracemalloc)}
        )
    stack = _setup(stack_, workdir, args.cache, ttl=int(seconds) + 3600, env=env)
    time.sleep(1.0)
    idle = _held(stack)
    idle_rss = resident_memory(stack.proxy.pid) / MB
    load = Load(stack, args.clients, args.seed)
    print(_header(), file=sys.stderr, flush=True)
    samples = asyncio.run(
        _measure(
            stack,
            load,
            seconds,
            args.interval,
            lambda s: print(_line(s), file=sys.stderr, flush=True),
        )
    )
    after = _held(stack)
    deadline = time.monotonic() + 2.0
    while (after[1] or after[0] > idle[0] + 2) and time.monotonic() < deadline:
        time.sleep(0.1)
        after = _held(stack)
    after_rss = resident_memory(stack.proxy.pid) / MB
    verdict = _verdict(samples, seconds, load, idle, after)
    lines = [_header(), *map(_line, samples), "", *_render(args, samples, load, verdict, idle)]
    lines.insert(
        -len(verdict.checks) - 2, f"RSS {idle_rss:.1f} MB idle before, {after_rss:.1f} MB after"
    )
    if args.tracemalloc:
        lines += ["", *_allocations(snapshots)]
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "samples": [asdict(s) for s in samples],
        "statuses": dict(load.total.statuses),
        "errors": dict(load.total.errors),
        "truncated": load.total.truncated,
        "hangups": load.total.hangups,
        "operations": dict(load.operations),
        "idle": idle,
        "rss_idle_mb": round(idle_rss, 1),
        "rss_after_mb": round(after_rss, 1),
        "after": after,
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in verdict.checks],
        "passed": verdict.passed,
    }
    return lines, result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30, help="length of the load (default 30)")
    parser.add_argument(
        "--clients", type=int, default=16, help="concurrent clients, 8-32 (default 16)"
    )
    parser.add_argument(
        "--interval", type=float, default=10, help="seconds between samples (default 10)"
    )
    parser.add_argument("--seed", type=int, default=19, help="random seed of the load")
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT_DIR / "bench" / ".cache",
        help="where the data is written once",
    )
    parser.add_argument(
        "--tracemalloc",
        type=float,
        metavar="SECONDS",
        help="trace the proxy's allocations, a snapshot every SECONDS, and show what grew",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or not 1 <= args.clients <= 64 or args.interval <= 0:
        parser.error("--minutes and --interval must be > 0, --clients between 1 and 64")

    done = in_workdir("shanoir-bench-soak-", args.keep, lambda s, w: run(args, s, w))
    if done is None:
        return 130
    lines, result = done
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if args.strict and not result["passed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
