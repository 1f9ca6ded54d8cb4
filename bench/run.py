"""Throughput, latency and memory of the proxy against Orthanc directly and nginx.

    python bench/run.py [--quick] [--only NAME...] [--transport httpx|aiohttp|all|VARIANT]

See bench/README.md for what is measured and the targets. Always exits 0 once it has
measured: a MISS is a figure, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clients import (  # noqa: E402
    CpuMeter,
    ForeignCpu,
    RssSampler,
    bulk_rounds,
    interleaved_latency,
    request_rates,
    slow_read,
    tools,
)
from _data import BenchData, prepare  # noqa: E402
from _profile import py_spy, top_frames  # noqa: E402
from _report import Report  # noqa: E402
from _servers import MAPPING, PROXY_VARIANTS, NginxServer, start_proxy, versions  # noqa: E402
from shanoir_dicomweb_proxy import Upstream, UpstreamSettings  # noqa: E402
from shanoir_dicomweb_proxy._store import SqliteStore, sync_store  # noqa: E402
from shanoir_dicomweb_proxy.testing import OrthancServer  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache"

RETRIEVE = 'multipart/related; type="application/dicom"'
FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
JSON = "application/dicom+json"

# glibc's defaults make Orthanc give memory back and fault it in again on every request
# (~9,000 minor faults per series metadata): on these VMs that doubles its QIDO and metadata
# times, and whether a connection's worker thread is in that state is luck (12 vs 24 ms for the
# same metadata). With these, Orthanc keeps its heap and the reference stops jumping.
ORTHANC_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
}

_T = TypeVar("_T")
SLOW_RATE = 10e6  # bytes/s of the slow client in the memory check
RSS_TARGET_MIB = 32


@dataclass(frozen=True)
class Goal:
    """A workload's target (issue 17): ``identity`` and ``mapped`` are the least ratio of the
    proxy's figure to ``versus``'s (throughput, or latency reference/proxy); ``added_ms`` the
    most latency the proxy may add to ``versus``'s median."""

    versus: str  # "nginx" | "direct"
    identity: float = 0.0
    mapped: float = 0.0
    added_ms: float | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "bulk" | "requests" | "latency" | "memory"
    title: str
    accept: str
    paths: tuple[str, ...]
    concurrency: int = 1
    target: str = ""  # "bulk" | "latency" | "" (figures only): how figures compare
    goal: Goal | None = None  # issue 17's target, PASS or MISS in the report
    keepalive: bool = False  # bulk: back-to-back retrieves on one client connection


@dataclass(frozen=True)
class Sizing:
    series_reps: int
    series_c4_reps: int
    large_reps: int
    warmup_rounds: int
    slices: int  # request-rate runs per target, interleaved across targets
    slice_seconds: int  # length of each (wrk takes whole seconds)
    warmup_seconds: int
    latency_rounds: int  # c=1 latency: requests per target, interleaved across targets


FULL = Sizing(
    series_reps=30,
    series_c4_reps=12,
    large_reps=10,
    warmup_rounds=2,
    slices=5,
    slice_seconds=1,
    warmup_seconds=1,
    latency_rounds=300,
)
QUICK = Sizing(
    series_reps=10,
    series_c4_reps=4,
    large_reps=4,
    warmup_rounds=1,
    slices=2,
    slice_seconds=1,
    warmup_seconds=1,
    latency_rounds=100,
)


@dataclass
class Target:
    name: str
    kind: str  # "direct" | "nginx" | "proxy"
    base: str  # DICOMweb base URL
    meters: dict[str, CpuMeter] = field(default_factory=dict)
    pid: int | None = None
    note: str = ""
    public: dict[str, str] = field(default_factory=dict)  # real UID → public UID (mapped)

    def url(self, path: str) -> str:
        """The URL of ``path`` (written with real UIDs) on this target."""
        if self.public:
            path = _UID_SEGMENT.sub(lambda m: m[1] + self.public.get(m[2], m[2]), path)
        return self.base + path


_UID_SEGMENT = re.compile(r"(/(?:studies|series)/)([0-9.]+)")


def _public_uids(store_path: Path) -> dict[str, str]:
    """Real → public UIDs of everything in a synced store, with bench/_servers.py's roots."""
    with SqliteStore(store_path) as store:
        entries = store.entries()
    study_root, series_root = MAPPING["study_root"], MAPPING["series_root"]
    public = {e.study_uid: f"{study_root}.{e.exam_id}" for e in entries}
    for entry in entries:
        for a in entry.acquisitions:
            public[a.series_uid] = f"{series_root}.{a.acquisition_id}"
    return public


def _sync(orthanc: OrthancServer, store_path: Path) -> None:
    upstream = Upstream(UpstreamSettings(url=orthanc.dicomweb_url, transport="httpx"))

    async def sync() -> None:
        try:
            with SqliteStore(store_path) as store:
                await sync_store(store, upstream)
        finally:
            await upstream.aclose()

    asyncio.run(sync())


WORKLOAD_NAMES = (
    "memory",
    "series-c1",
    "series-c4",
    "large-c1",
    "frames-c8",
    "frames-small-c8",
    "qido-c1",
    "qido-c4",
    "metadata-c1",
)


def workloads(data: BenchData) -> list[Workload]:
    series = data.series
    series_path = f"/studies/{series.study_uid}/series/{series.series_uid}"
    large = data.samples.large
    large_path = f"/studies/{large.study_uid}/series/{large.series_uid}/instances/{large.sop_uid}"
    frames = tuple(f"{series_path}/instances/{uid}/frames/1" for uid in series.instance_uids)
    small_frames = tuple(
        f"/studies/{study.uid}/series/{s.uid}/instances/{uid}/frames/1"
        for study in data.samples.small_studies
        for s in study.series
        if s.modality in ("MR", "CT")
        for uid in s.instances
    )
    qido = ("/studies?limit=10&includefield=00081030,00080061",)
    mb = series.bytes_on_disk / 1e6
    out = [
        Workload(
            "memory",
            "memory",
            f"RSS growth, slow client ({SLOW_RATE / 1e6:.0f} MB/s) on the large instance",
            RETRIEVE,
            (large_path,),
        ),
        Workload(
            "series-c1",
            "bulk",
            f"series retrieve, {len(frames)} x 512x512 ({mb:.0f} MB), c=1",
            RETRIEVE,
            (series_path,),
            1,
            "bulk",
            goal=Goal("nginx", 0.95, 0.85),
        ),
        Workload(
            "series-c4",
            "bulk",
            "series retrieve, same series, c=4",
            RETRIEVE,
            (series_path,),
            4,
            "bulk",
            goal=Goal("nginx", 0.95, 0.85),
        ),
        Workload(
            "large-c1",
            "bulk",
            f"instance retrieve, {large.frames}-frame ({large.path.stat().st_size / 1e6:.1f} MB), "
            "c=1, kept-alive client connection",
            RETRIEVE,
            (large_path,),
            1,
            "bulk",
            keepalive=True,
            goal=Goal("nginx", 0.95, 0.95),
        ),
        Workload(
            "frames-c8",
            "requests",
            f"/frames/1 of the 512x512 instances (512 KiB), c=8, {len(frames)} URLs",
            FRAMES,
            frames,
            8,
            goal=Goal("nginx", 0.9, 0.9),
        ),
        Workload(
            "frames-small-c8",
            "requests",
            f"/frames/1 of the 64x64 sample instances (8 KiB), c=8, {len(small_frames)} URLs",
            FRAMES,
            small_frames,
            8,
            goal=Goal("nginx", 0.9, 0.9),
        ),
        Workload(
            "qido-c1",
            "latency",
            "QIDO " + qido[0] + ", c=1",
            JSON,
            qido,
            1,
            "latency",
            goal=Goal("direct", added_ms=0.5),
        ),
        Workload("qido-c4", "requests", "QIDO, same query, c=4", JSON, qido, 4, "latency"),
        Workload(
            "metadata-c1",
            "latency",
            f"series metadata ({len(frames)} instances), c=1",
            JSON,
            (series_path + "/metadata",),
            1,
            "latency",
            goal=Goal("direct", 0.95, 0.95),
        ),
    ]
    assert tuple(w.name for w in out) == WORKLOAD_NAMES
    return out


def select(all_workloads: list[Workload], only: Sequence[str] | None) -> list[Workload]:
    if not only:
        return all_workloads
    names = [w.name for w in all_workloads]
    chosen = set()
    for pattern in only:
        matches = [n for n in names if n == pattern or n.startswith(pattern)]
        if not matches:
            raise SystemExit(f"--only {pattern}: no such workload (one of: {', '.join(names)})")
        chosen.update(matches)
    return [w for w in all_workloads if w.name in chosen]


def _headers(accept: str) -> dict[str, str]:
    # Orthanc gzips whatever it can when asked; the proxy asks for identity anyway.
    return {"Accept": accept, "Accept-Encoding": "identity"}


def _log(start: float, message: str) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizing = QUICK if args.quick else FULL
        self.clients = tools(force_httpx=args.client == "httpx")
        self.start = time.monotonic()
        self.results: dict[str, Any] = {}
        self.report = Report()
        self.profile_dir: Path | None = None
        self.foreign = ForeignCpu()
        if args.py_spy:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.profile_dir = CACHE / "profiles" / stamp

    def log(self, message: str) -> None:
        _log(self.start, message)

    # -- setup ---------------------------------------------------------------------------------

    def run(self, stack: contextlib.ExitStack, workdir: Path) -> None:
        args = self.args
        self.log("preparing samples in bench/.cache (reused when present)")
        data = prepare(CACHE)
        chosen = select(workloads(data), args.only)

        orthanc = OrthancServer(workdir / "orthanc")
        stack.callback(orthanc.stop)
        malloc = {} if args.orthanc_default_malloc else ORTHANC_MALLOC
        with _environ(malloc):  # Orthanc inherits our environment; nothing else gets these
            orthanc.start()
        self.log(f"Orthanc on {orthanc.url}: loading {len(data.files)} files")
        orthanc.load(data.files)
        orthanc_meter = CpuMeter([orthanc.pid])

        tuning = " ".join(f"{k}={v}" for k, v in malloc.items()) or "glibc malloc defaults"
        targets = [
            Target(
                "direct",
                "direct",
                orthanc.dicomweb_url,
                {"orthanc": orthanc_meter},
                note=f"Orthanc with {tuning}",
            )
        ]
        if not args.no_nginx:
            nginx = self._start_nginx(stack, workdir, orthanc.port)
            if nginx is not None:
                meters = {"self": CpuMeter([nginx.pid]), "orthanc": orthanc_meter}
                targets.append(Target("nginx", "nginx", nginx.dicomweb_url, meters, nginx.pid))
        variants = args.transport
        store, public = workdir / "store.sqlite3", {}
        if any(PROXY_VARIANTS[name].mapped for name in variants):
            self.log("store sync for the mapped proxy")
            _sync(orthanc, store)
            public = _public_uids(store)
        for name in variants:
            variant = PROXY_VARIANTS[name]
            proxy = start_proxy(variant, workdir / "proxies", orthanc.dicomweb_url, store=store)
            stack.callback(proxy.stop)
            meters = {"self": CpuMeter([proxy.pid]), "orthanc": orthanc_meter}
            target = Target(
                f"proxy[{name}]", "proxy", proxy.dicomweb_url, meters, proxy.pid, variant.note
            )
            if variant.mapped:
                target.public = public
            targets.append(target)
            self.log(f"proxy[{name}] on {proxy.url} ({variant.note})")

        self.report.header(
            clients=self.clients,
            versions=versions() | {"orthanc": _orthanc_version(orthanc), "nginx": _nginx_version()},
            targets=[(t.name, t.base, t.note) for t in targets],
            quick=args.quick,
        )
        # The memory check comes first, on proxies that have served nothing big yet.
        for workload in chosen:
            if workload.kind == "memory":
                self.memory(workload, [t for t in targets if t.kind == "proxy"])
        self.validate(chosen, targets)
        for workload in chosen:
            if workload.kind == "memory":
                continue
            self.log(f"{workload.name}: {workload.title}")
            foreign, started = self.foreign.seconds(), time.monotonic()
            with self._profiling(workload, targets):
                if workload.kind == "bulk":
                    self.bulk(workload, targets)
                elif workload.kind == "latency":
                    self.latency(workload, targets)
                else:
                    self.requests(workload, targets)
            share = max(0.0, self.foreign.seconds() - foreign) / (time.monotonic() - started)
            self.report.foreign(workload, share)
        for target in targets:
            if target.kind == "proxy" and target.pid is not None:
                self.report.final_rss(target.name, RssSampler(target.pid).rss())

    @contextlib.contextmanager
    def _profiling(self, workload: Workload, targets: list[Target]) -> Iterator[None]:
        """With --py-spy: sample every proxy process while the workload runs."""
        if self.profile_dir is None:
            yield
            return
        pids = {t.name: t.pid for t in targets if t.kind == "proxy" and t.pid is not None}
        with py_spy(pids, self.profile_dir, workload.name) as outputs:
            yield
        for name, path in outputs.items():
            self.report.profile(workload.name, name, top_frames(path), path)

    def _start_nginx(
        self, stack: contextlib.ExitStack, workdir: Path, upstream_port: int
    ) -> NginxServer | None:
        if NginxServer.find() is None:
            self.report.note("nginx not found (apt-get install -y nginx): no nginx reference")
            return None
        nginx = NginxServer(workdir / "nginx", upstream_port)
        stack.callback(nginx.stop)
        try:
            nginx.start()
        except RuntimeError as exc:
            self.report.note(f"nginx did not start, no nginx reference: {exc}")
            return None
        self.log(f"nginx on {nginx.url}")
        return nginx

    def validate(self, chosen: list[Workload], targets: list[Target]) -> None:
        """Every URL answers 200 on every target, with the same length for binary answers."""
        with httpx.Client(timeout=120, trust_env=False) as client:
            for workload in chosen:
                if workload.kind == "memory":
                    continue
                for path in workload.paths[:3]:
                    lengths = {}
                    for target in targets:
                        response = client.get(target.url(path), headers=_headers(workload.accept))
                        if response.status_code != 200:
                            raise RuntimeError(
                                f"{target.name} {path}: status {response.status_code} "
                                f"{response.text[:300]}"
                            )
                        if response.headers.get("content-encoding", "identity") != "identity":
                            raise RuntimeError(f"{target.name} {path}: answer is compressed")
                        lengths[target.name] = len(response.content)
                    if workload.accept != JSON and len(set(lengths.values())) > 1:
                        self.report.note(f"{workload.name}: lengths differ {lengths} for {path}")

    # -- workloads -----------------------------------------------------------------------------

    def bulk(self, workload: Workload, targets: list[Target]) -> None:
        s = self.sizing
        reps = {"series-c1": s.series_reps, "series-c4": s.series_c4_reps}.get(
            workload.name, s.large_reps
        )
        urls = {t.name: [t.url(workload.paths[0])] * workload.concurrency for t in targets}
        rounds = bulk_rounds(
            self.clients["bulk"],
            urls,
            _headers(workload.accept),
            reps=reps,
            warmup=s.warmup_rounds,
            keepalive=workload.keepalive,
            meters={t.name: t.meters for t in targets},
        )
        for target in targets:
            mapped = bool(target.public)
            self.report.bulk(workload, target.name, target.kind, rounds[target.name], mapped)
        self.results[workload.name] = {k: [asdict(r) for r in v] for k, v in rounds.items()}

    def requests(self, workload: Workload, targets: list[Target]) -> None:
        s = self.sizing
        stats = request_rates(
            self.clients["requests"],
            {t.name: [t.url(p) for p in workload.paths] for t in targets},
            _headers(workload.accept),
            concurrency=workload.concurrency,
            slices=s.slices,
            slice_seconds=s.slice_seconds,
            warmup_seconds=s.warmup_seconds,
            meters={t.name: t.meters for t in targets},
        )
        for target in targets:
            if stats[target.name].errors:
                self.report.note(
                    f"{workload.name} {target.name}: {stats[target.name].errors} errors"
                )
            mapped = bool(target.public)
            self.report.requests(workload, target.name, target.kind, stats[target.name], mapped)
        self.results[workload.name] = {name: asdict(value) for name, value in stats.items()}

    def latency(self, workload: Workload, targets: list[Target]) -> None:
        """c=1 latency, one request per target in turn (see ``interleaved_latency``)."""
        paired = interleaved_latency(
            {t.name: t.url(workload.paths[0]) for t in targets},
            _headers(workload.accept),
            rounds=self.sizing.latency_rounds,
            meters={t.name: t.meters for t in targets},
        )
        for target in targets:
            stats = paired.stats[target.name]
            mapped = bool(target.public)
            added = paired.added.get(target.name)
            self.report.requests(workload, target.name, target.kind, stats, mapped, added)
        self.results[workload.name] = {
            name: asdict(value) | {"added": paired.added.get(name)}
            for name, value in paired.stats.items()
        }

    def memory(self, workload: Workload, proxies: list[Target]) -> None:
        self.log(f"{workload.name}: {workload.title}")
        out = {}
        for target in proxies:
            assert target.pid is not None
            url = target.url(workload.paths[0])
            with httpx.Client(timeout=60, trust_env=False) as client:  # warm the process up
                for _ in range(3):
                    client.get(target.base + "/studies?limit=5", headers=_headers(JSON))
            sampler = RssSampler(target.pid)
            baseline = sampler.baseline()
            with sampler:
                size, seconds = slow_read(url, _headers(workload.accept), rate=SLOW_RATE)
            peak = max(sampler.samples)
            self.report.memory(target.name, baseline, peak, size, seconds, RSS_TARGET_MIB)
            out[target.name] = {
                "baseline": baseline,
                "peak": peak,
                "bytes": size,
                "seconds": seconds,
                "samples": len(sampler.samples),
            }
        self.results[workload.name] = out


def _orthanc_version(orthanc: OrthancServer) -> str:
    system = httpx.get(orthanc.url + "/system", timeout=10, trust_env=False).json()
    plugins = httpx.get(orthanc.url + "/plugins/dicom-web", timeout=10, trust_env=False).json()
    return f"{system['Version']} (DICOMweb plugin {plugins.get('Version', '?')})"


def _nginx_version() -> str:
    binary = NginxServer.find()
    if binary is None:
        return "-"
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return result.stderr.strip().rsplit("/", 1)[-1]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for processes started meanwhile, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that every process we started is stopped."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def in_workdir(
    prefix: str, keep: bool, work: Callable[[contextlib.ExitStack, Path], _T]
) -> _T | None:
    """``work(stack, workdir)`` in a fresh work dir; every server it puts on ``stack`` is
    stopped at the end, on Ctrl-C or SIGTERM too (then None, said on stderr); the dir is
    removed unless ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with _terminate_as_interrupt(), contextlib.ExitStack() as stack:
            if not keep:
                stack.callback(shutil.rmtree, workdir, True)
            result = work(stack, workdir)
    except KeyboardInterrupt:
        print("interrupted: every server was stopped", file=sys.stderr)
        return None
    if keep:
        print(f"work dir kept: {workdir}", file=sys.stderr)
    return result


def report_in_workdir(
    prefix: str, keep: bool, work: Callable[[contextlib.ExitStack, Path], list[str]]
) -> int:
    """:func:`in_workdir`, then the report's lines printed: a bench script's exit status (130
    when interrupted)."""
    lines = in_workdir(prefix, keep, work)
    if lines is None:
        return 130
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
        epilog="workloads: " + ", ".join(WORKLOAD_NAMES),
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~1 minute)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="workloads (names or prefixes)")
    parser.add_argument(
        "--transport",
        default="aiohttp",
        type=_variants,
        help="proxy variant(s) to measure, comma-separated, or all (default: aiohttp, the "
        f"proxy's default); variants: {', '.join(PROXY_VARIANTS)}",
    )
    parser.add_argument(
        "--client",
        default="auto",
        choices=["auto", "httpx"],
        help="auto: curl for bulk and wrk for request rates when installed; httpx: always the "
        "httpx load generator process",
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument(
        "--orthanc-default-malloc",
        action="store_true",
        help="run Orthanc with glibc's default malloc settings (page-fault-bound on these VMs: "
        "QIDO and metadata about 2x slower, and bimodal between connections)",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the proxy with py-spy (non-blocking) during each workload; folded stacks "
        "go to bench/.cache/profiles/, the top self frames into the report",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)

    bench = Bench(args)
    workdir = Path(tempfile.mkdtemp(prefix="shanoir-bench-"))
    try:
        with _terminate_as_interrupt(), contextlib.ExitStack() as stack:
            if not args.keep:
                stack.callback(_rmtree, workdir)
            bench.run(stack, workdir)
            bench.log("stopping servers")
    except KeyboardInterrupt:
        print("interrupted: every server was stopped", file=sys.stderr)
        return 130
    if args.keep:
        print(f"work dir kept: {workdir}", file=sys.stderr)
    print(bench.report.render())
    CACHE.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = CACHE / f"results-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "results": bench.results}, indent=1))
    print(f"raw figures: {out.relative_to(BENCH_DIR.parent)}")
    return 0


def _variants(value: str) -> list[str]:
    if value == "all":
        return list(PROXY_VARIANTS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in PROXY_VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; see --help")
    return names


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
