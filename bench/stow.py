"""STOW-RS of a large batch through the full stack (auth + access + translation) vs direct.

    python bench/stow.py [--mb 200] [--rounds 3] [--engine uvicorn] [--spool] [--keep]

Issue 6: one ``POST /studies`` of ~200 MB (instances of ~5 MB, uncompressed 16-bit pixel data)
into an examination the user may write into, through the proxy (public study and series UIDs,
translated to the real ones and sent to the PACS as they come, ``[upstream] stream_uploads``;
with ``--spool``, spooled then sent) and to the same Orthanc directly
(real UIDs, same bytes otherwise), alternately in the same run, after one warm-up round each.
Every round carries fresh SOP Instance UIDs, so every upload stores new instances. The body is
streamed by httpx with a Content-Length; one more round per target sends it chunked.

Targets: >= 0.8x direct throughput, and a peak RSS growth of the proxy < 64 MB during an upload
(VmHWM reset before, read after, minus the RSS before). The bench prints figures and always
exits 0 once it has measured. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clients import CpuMeter, ForeignCpu  # noqa: E402
from _servers import versions  # noqa: E402
from access import MR_IMAGE, Bench, _Spec, _sync, _uid, _upload  # noqa: E402
from run import (  # noqa: E402
    ORTHANC_MALLOC,
    _environ,
    _orthanc_version,
    _public_uids,
    report_in_workdir,
)
from shanoir_dicomweb_proxy import Settings  # noqa: E402
from shanoir_dicomweb_proxy._auth import dev_token  # noqa: E402
from shanoir_dicomweb_proxy._store import SqliteStore  # noqa: E402
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer  # noqa: E402
from shanoir_dicomweb_proxy.testing._process import resident_memory  # noqa: E402

TARGET = 0.8  # issue 6: >= 0.8x direct
RSS_TARGET_MB = 64  # issue 6: peak RSS growth < 64 MB during an upload
SIDE = 1600  # 1600 x 1600 x 2 bytes: 5.12 MB of pixel data per instance
BOUNDARY = "shanoir-bench-stow-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PIECE = 1 << 20  # bytes per chunk the client hands to httpx
USER = "writer"
SEED_INSTANCES = 3  # the small study loaded directly first


# -- the batch ---------------------------------------------------------------------------------


class Batch:
    """``count`` instances of one shared pixel buffer: only their headers are written per round
    (pydicom, without PixelData), the pixel element is appended as bytes, so the ~200 MB body is
    never held in memory on the client side."""

    def __init__(self, count: int) -> None:
        self.count = count
        ramp = np.add.outer(np.arange(SIDE), np.arange(SIDE)) % 4096
        self.pixels = memoryview(ramp.astype("<u2").tobytes())
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
        self.pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + len(self.pixels).to_bytes(4, "little")
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MR_IMAGE
        ds.PatientID, ds.PatientName = "STOW", "BENCH^STOW"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.Modality = "MR"
        ds.Manufacturer = "BENCH"
        ds.SeriesNumber = 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness, ds.PixelSpacing = 1, [0.5, 0.5]
        ds.Rows = ds.Columns = SIDE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(MR_IMAGE)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        self.ds = ds

    def _header(self, study: str, series: str, sop: str, number: int) -> bytes:
        ds = self.ds
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [-400, -400, number]
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()

    def body(self, study: str, series: str) -> tuple[list[bytes | memoryview], list[str]]:
        """The multipart body as pieces (the pixel buffer shared), and its SOP Instance UIDs."""
        pieces: list[bytes | memoryview] = []
        sops = [str(generate_uid()) for _ in range(self.count)]
        for number, sop in enumerate(sops, 1):
            pieces.append(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            pieces.append(self._header(study, series, sop, number) + self.pixel_header)
            pieces += [self.pixels[i : i + PIECE] for i in range(0, len(self.pixels), PIECE)]
            pieces.append(b"\r\n")
        pieces.append(f"--{BOUNDARY}--\r\n".encode())
        return pieces, sops


# -- one upload --------------------------------------------------------------------------------


@dataclass
class Upload:
    target: str
    round: str  # "warm-up", "1", ..., "chunked"
    seconds: float
    size: int
    cpu: dict[str, float]
    status: int
    stored: int
    expected: int
    rss_growth: int | None = None  # bytes, proxy only

    @property
    def rate(self) -> float:
        return self.size / self.seconds / 1e6

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.stored == self.expected


@dataclass
class Target:
    name: str
    url: str  # .../studies
    headers: dict[str, str]
    study: str
    series: str
    meters: dict[str, CpuMeter]
    pid: int | None = None  # the proxy's, for its memory
    uploads: list[Upload] = field(default_factory=list)


def _peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _stored(response: httpx.Response, sops: Sequence[str]) -> int:
    """How many of ``sops`` the answer references (0 unless it is DICOM JSON)."""
    try:
        answer = response.json()
    except ValueError:
        return 0
    items = answer.get("00081199", {}).get("Value", []) if isinstance(answer, dict) else []
    referenced = {i.get("00081155", {}).get("Value", [None])[0] for i in items}
    return len(referenced & set(sops))


def upload(client: httpx.Client, target: Target, batch: Batch, label: str, chunked: bool) -> Upload:
    pieces, sops = batch.body(target.study, target.series)
    size = sum(len(p) for p in pieces)
    headers = {**target.headers, "Content-Type": STOW_TYPE, "Accept": "application/dicom+json"}
    if not chunked:
        headers["Content-Length"] = str(size)

    def stream() -> Iterator[bytes | memoryview]:
        yield from pieces

    before_rss = 0
    if target.pid is not None:
        with open(f"/proc/{target.pid}/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak (VmHWM) to the current resident size
        before_rss = resident_memory(target.pid)
    cpu = {key: m.seconds() for key, m in target.meters.items()}
    started = time.perf_counter()
    response = client.post(target.url, content=stream(), headers=headers)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    cpu = {key: m.seconds() - cpu[key] for key, m in target.meters.items()}
    result = Upload(
        target.name,
        label,
        seconds,
        size,
        cpu,
        response.status_code,
        _stored(response, sops),
        len(sops),
    )
    if target.pid is not None:
        result.rss_growth = _peak(target.pid) - before_rss
    target.uploads.append(result)
    return result


# -- the run -----------------------------------------------------------------------------------


def _setup(
    stack: contextlib.ExitStack, workdir: Path, log: Bench, *, stream: bool, engine: str
) -> tuple[OrthancServer, ProxyServer, str, str, dict[str, str]]:
    """Fresh Orthanc with one small study, the store synced, the proxy started (as
    bench/access.py, with ``[upstream] stream_uploads = stream`` and ``[server] engine``),
    ``writer`` granted read and write on the study's examination."""
    orthanc = OrthancServer(workdir / "orthanc")
    stack.callback(orthanc.stop)
    with _environ(ORTHANC_MALLOC):  # as bench/run.py: Orthanc keeps its heap
        orthanc.start()
    study, series = _uid("stow", "study"), _uid("stow", "series")
    specs = [
        _Spec(study, series, _uid("stow", "instance", i), "STOW", "20240101", "STOW", 1, i + 1)
        for i in range(SEED_INSTANCES)
    ]
    asyncio.run(_upload(orthanc.url, specs, 1))
    store = workdir / "store.sqlite3"
    _sync(orthanc, store)
    public = _public_uids(store)
    with SqliteStore(store) as opened:
        (entry,) = opened.entries()
        for action in ("read", "write"):
            opened.grant(USER, entry.exam_id, action)
    proxy = log._proxy(
        stack,
        workdir,
        orthanc,
        store,
        upstream={"stream_uploads": stream},
        server={"engine": engine},
    )
    config = Settings.from_toml(proxy.config_path)
    token = dev_token(config, USER, {"userId": USER}, ttl=3600)
    real = {"study": study, "series": series}
    ids = {"study": public[study], "series": public[series], "token": token}
    log.log(
        f"Orthanc on {orthanc.url}, proxy on {proxy.url}; exam {entry.exam_id}: "
        f"{study} → {ids['study']}"
    )
    return orthanc, proxy, real["study"], real["series"], ids


def run(args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path) -> list[str]:
    log = Bench(argparse.Namespace(client="httpx"))
    load = os.getloadavg()
    orthanc, proxy, study, series, ids = _setup(
        stack, workdir, log, stream=not args.spool, engine=args.engine
    )
    orthanc_meter = CpuMeter([orthanc.pid])
    proxy_meters = {"proxy": CpuMeter([proxy.pid]), "orthanc": orthanc_meter}
    targets = [
        Target(
            "direct",
            orthanc.dicomweb_url + "/studies",
            {},
            study,
            series,
            {"orthanc": orthanc_meter},
        ),
        Target(
            "proxy",
            proxy.dicomweb_url + "/studies",
            {"Authorization": f"Bearer {ids['token']}"},
            ids["study"],
            ids["series"],
            proxy_meters,
            proxy.pid,
        ),
    ]
    count = max(1, round(args.mb * 1e6 / (SIDE * SIDE * 2)))
    batch = Batch(count)
    foreign = ForeignCpu()
    idle_rss = resident_memory(proxy.pid)
    before = foreign.seconds()
    time.sleep(1)
    idle_foreign = max(0.0, foreign.seconds() - before)  # other work on the machine, idle
    started_foreign, started = foreign.seconds(), time.monotonic()
    with httpx.Client(timeout=600, trust_env=False) as client:
        rounds = ["warm-up", *map(str, range(1, args.rounds + 1)), "chunked"]
        for n, label in enumerate(rounds):
            # Each upload starts with no dirty pages left by the previous one (os.sync, not
            # timed), and the order alternates, so that neither target pays for the other.
            for target in targets if n % 2 == 0 else targets[::-1]:
                os.sync()
                up = upload(client, target, batch, label, chunked=label == "chunked")
                rss = "" if up.rss_growth is None else f", RSS +{up.rss_growth / 1e6:.1f} MB"
                log.log(
                    f"{label:>7} {target.name:<6} {up.status} {up.stored}/{up.expected} "
                    f"{up.seconds:.2f} s {up.rate:.0f} MB/s{rss}"
                )
    share = max(0.0, foreign.seconds() - started_foreign) / (time.monotonic() - started)
    return _report(args, targets, batch, orthanc, load, (idle_foreign, share), idle_rss)


def _report(
    args: argparse.Namespace,
    targets: list[Target],
    batch: Batch,
    orthanc: OrthancServer,
    load: tuple[float, float, float],
    foreign: tuple[float, float],
    idle_rss: int,
) -> list[str]:
    direct, proxy = targets
    size = direct.uploads[0].size
    out = [
        f"shanoir-dicomweb-proxy STOW bench ({os.cpu_count()} CPUs, load average "
        + ", ".join(f"{x:.2f}" for x in load)
        + " at start)",
        "versions: "
        + ", ".join(
            f"{k} {v}" for k, v in (versions() | {"orthanc": _orthanc_version(orthanc)}).items()
        ),
        f"batch: POST /studies of {batch.count} MR instances of {SIDE}x{SIDE} 16-bit "
        f"(uncompressed), {size / 1e6:.1f} MB of multipart body, fresh SOP Instance UIDs per "
        "round; httpx, one kept-alive connection, Content-Length (last round: chunked)",
        f"proxy: {args.engine}, [auth] local JWKS + dev token, [mapping] sqlite, [access] "
        f"sqlite, aiohttp upstream, stream_uploads = {str(not args.spool).lower()}; public "
        f"study/series UIDs in, real ones out (idle RSS {idle_rss / 1e6:.0f} MB)",
        f"CPU outside the bench's processes: {foreign[0] * 100:.0f}% of a core idle (1 s before), "
        f"{foreign[1] * 100:.0f}% during the uploads (mostly the kernel's: loopback TCP, "
        "writeback of Orthanc's files)",
        "",
        f"  {'round':<8} {'target':<7} {'status':>6} {'stored':>7} {'seconds':>8} {'MB/s':>6} "
        f"{'cpu proxy':>9} {'orthanc':>7} {'RSS growth':>11} {'x direct':>8}",
    ]
    for mine, theirs in zip(direct.uploads, proxy.uploads, strict=True):
        for up in (mine, theirs):
            cpu = {k: v / up.seconds for k, v in up.cpu.items()}
            proxy_cpu = f"{cpu['proxy'] * 100:.0f}%" if "proxy" in cpu else "-"
            rss = "-" if up.rss_growth is None else f"{up.rss_growth / 1e6:.1f} MB"
            ratio = f"{mine.seconds / up.seconds:.2f}" if up is theirs else ""
            out.append(
                f"  {up.round:<8} {up.target:<7} {up.status:>6} "
                f"{f'{up.stored}/{up.expected}':>7} {up.seconds:>8.2f} {up.rate:>6.0f} "
                f"{proxy_cpu:>9} {cpu.get('orthanc', 0) * 100:>6.0f}% {rss:>11} {ratio:>8}"
            )
    measured = [str(r) for r in range(1, args.rounds + 1)]

    def median(target: Target) -> float:
        return statistics.median(u.seconds for u in target.uploads if u.round in measured)

    d, p = median(direct), median(proxy)
    ratio = d / p
    growth = max(u.rss_growth or 0 for u in proxy.uploads)
    failed = [f"{u.target} {u.round}" for t in targets for u in t.uploads if not u.ok]
    out += [
        "",
        f"median of rounds 1-{args.rounds}: direct {d:.2f} s ({size / d / 1e6:.0f} MB/s), "
        f"proxy {p:.2f} s ({size / p / 1e6:.0f} MB/s)",
        f"targets: throughput >= {TARGET}x direct: {ratio:.2f}x "
        f"{'met' if ratio >= TARGET else 'MISSED'}; proxy peak RSS growth < {RSS_TARGET_MB} MB: "
        f"{growth / 1e6:.1f} MB (max over every upload) "
        f"{'met' if growth < RSS_TARGET_MB * 1e6 else 'MISSED'}",
        "x direct: direct seconds of the same round / proxy seconds; RSS growth: VmHWM after the "
        "upload - VmRSS before it (VmHWM reset just before).",
    ]
    if failed:
        out.append("answers not 200 with every instance referenced: " + ", ".join(failed))
    if foreign[0] > 0.1:
        out.append("other processes used more than 10% of a core idle: the figures are disturbed")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=200, help="batch size in MB (default 200)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds per target (default 3)"
    )
    parser.add_argument(
        "--engine",
        choices=("hypercorn", "uvicorn"),
        default="hypercorn",
        help="[server] engine of the proxy (default hypercorn, serve's own default)",
    )
    parser.add_argument(
        "--spool",
        action="store_true",
        help="[upstream] stream_uploads = false: the proxy sends the batch once read whole",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    if args.mb <= 0 or args.rounds < 1:
        parser.error("--mb must be > 0 and --rounds >= 1")

    return report_in_workdir("shanoir-bench-stow-", args.keep, lambda s, w: run(args, s, w))


if __name__ == "__main__":
    raise SystemExit(main())
