"""Load generators: curl for bulk, wrk for request rates, an httpx process when they are missing,
a raw-socket client for interleaved latencies at c=1, and a slow raw-socket reader with an RSS
sampler for the memory check."""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shanoir_dicomweb_proxy.testing import resident_memory

__all__ = [
    "BulkRound",
    "CpuMeter",
    "ForeignCpu",
    "PairedStats",
    "RequestStats",
    "RssSampler",
    "Slice",
    "bulk_rounds",
    "interleaved_latency",
    "percentile",
    "request_rates",
    "slow_read",
    "tools",
]

_LOADGEN = Path(__file__).resolve().parent / "_loadgen.py"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in 0..100."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def tools(force_httpx: bool = False) -> dict[str, str]:
    """Which client runs which kind of workload: ``{"bulk": ..., "requests": ...}``."""
    curl = None if force_httpx else shutil.which("curl")
    wrk = None if force_httpx else shutil.which("wrk")
    return {"bulk": "curl" if curl else "httpx", "requests": "wrk" if wrk else "httpx"}


class CpuMeter:
    """CPU seconds used by a set of processes and their children (Linux ``/proc``)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _tree(self, pid: int) -> list[int]:
        out = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    for child in children.read().split():
                        out += self._tree(int(child))
        except OSError:
            pass
        return out

    def seconds(self) -> float:
        total = 0
        for root in self.pids:
            for pid in self._tree(root):
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / self._tick


class ForeignCpu:
    """CPU seconds used on the whole machine by processes that are not ours.

    Ours: this process, its live descendants, and its reaped children (curl, wrk). Other work on
    the machine (another engineer's test run) takes cores from Orthanc and the proxy alike, so the
    bench reports it next to the figures it may have disturbed.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._ours = CpuMeter([os.getpid()])

    def _busy(self) -> float:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle, iowait
        return (sum(fields[:8]) - idle) / self._tick  # user..steal

    def _own_children(self) -> float:
        with open(f"/proc/{os.getpid()}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / self._tick  # cutime, cstime

    def seconds(self) -> float:
        return self._busy() - self._ours.seconds() - self._own_children()


# -- bulk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BulkRound:
    """One round of ``c`` concurrent retrieves: wall seconds, total bytes, CPU per process."""

    seconds: float
    bytes: int
    cpu: Mapping[str, float] = field(default_factory=dict)


def _curl_round(urls: Sequence[str], headers: Mapping[str, str]) -> tuple[float, int]:
    command = ["curl", "-sS", "--no-progress-meter"]
    command += ["-w", "%{http_code} %{size_download} %{time_total}\\n"]
    if len(urls) > 1:
        command += ["--parallel", "--parallel-immediate", "--parallel-max", str(len(urls))]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    for url in urls:
        command += ["-o", "/dev/null", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 3 * len(urls):
        raise RuntimeError(f"curl failed ({result.returncode}): {result.stderr.strip()}")
    codes, sizes, times = lines[0::3], lines[1::3], lines[2::3]
    if any(code != "200" for code in codes):
        raise RuntimeError(f"curl: unexpected status {codes} for {urls[0]}")
    # All transfers start together (--parallel-immediate): the round lasts as long as the slowest.
    return max(float(t) for t in times), sum(int(s) for s in sizes)


def _curl_sequence(url: str, headers: Mapping[str, str], count: int) -> list[tuple[float, int]]:
    """``count`` retrieves of ``url`` one after the other on one kept-alive connection."""
    command = ["curl", "-sS", "--no-progress-meter"]
    command += ["-w", "%{http_code} %{size_download} %{time_total}\\n"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    for _ in range(count):
        command += ["-o", "/dev/null", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    fields = result.stdout.split()
    if result.returncode != 0 or len(fields) != 3 * count:
        raise RuntimeError(f"curl failed ({result.returncode}): {result.stderr.strip()}")
    if any(code != "200" for code in fields[0::3]):
        raise RuntimeError(f"curl: unexpected status {fields[0::3]} for {url}")
    return [(float(t), int(s)) for s, t in zip(fields[1::3], fields[2::3], strict=True)]


def bulk_rounds(
    client: str,
    targets: Mapping[str, Sequence[str]],
    headers: Mapping[str, str],
    *,
    reps: int,
    warmup: int,
    keepalive: bool = False,
    meters: Mapping[str, Mapping[str, CpuMeter]] | None = None,
) -> dict[str, list[BulkRound]]:
    """Run ``reps`` rounds per target; a round fetches the target's URLs concurrently.

    With curl, rounds are interleaved across targets (A B C A B C ...) so that a drift of the
    machine hits all of them alike; ``meters`` (per target: name -> meter) measure CPU per round.
    Each round is a new connection, unless ``keepalive`` (one URL per target): then each target
    gets two blocks of back-to-back retrieves on one connection, interleaved, warm-up first.
    """
    if client == "httpx":
        return _httpx_bulk(targets, headers, reps=reps, warmup=warmup)
    out: dict[str, list[BulkRound]] = {name: [] for name in targets}
    meters = meters or {}
    if keepalive:
        blocks = [reps // 2, reps - reps // 2]
        for block in blocks:
            for name, urls in targets.items():
                (url,) = urls
                target_meters = meters.get(name, {})
                before = {key: m.seconds() for key, m in target_meters.items()}
                transfers = _curl_sequence(url, headers, warmup + block)
                cpu = {key: m.seconds() - before[key] for key, m in target_meters.items()}
                wall = sum(seconds for seconds, _ in transfers)
                for seconds, size in transfers[warmup:]:
                    share = {key: value * seconds / wall for key, value in cpu.items()}
                    out[name].append(BulkRound(seconds, size, share))
        return out
    for rep in range(warmup + reps):
        for name, urls in targets.items():
            target_meters = meters.get(name, {})
            before = {key: m.seconds() for key, m in target_meters.items()}
            seconds, size = _curl_round(urls, headers)
            if rep >= warmup:
                cpu = {key: m.seconds() - before[key] for key, m in target_meters.items()}
                out[name].append(BulkRound(seconds, size, cpu))
    return out


def _loadgen(spec: Mapping[str, object], timeout: float) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(_LOADGEN)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"httpx load generator failed:\n{result.stderr[-2000:]}")
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _httpx_bulk(
    targets: Mapping[str, Sequence[str]], headers: Mapping[str, str], *, reps: int, warmup: int
) -> dict[str, list[BulkRound]]:
    out: dict[str, list[BulkRound]] = {}
    for name, urls in targets.items():
        spec = {"mode": "bulk", "urls": list(urls), "headers": dict(headers)}
        spec |= {"reps": reps, "warmup": warmup}
        rounds = _loadgen(spec, timeout=600)["rounds"]
        assert isinstance(rounds, list)
        out[name] = [BulkRound(float(s), int(b)) for s, b in rounds]
    return out


# -- request rates ---------------------------------------------------------------------------

#: Latency quantiles kept per slice (0.5 %, 1.5 %, ..., 99.5 %): equal-weight points that let
#: slices of one target be pooled into one distribution.
_QUANTILES = tuple(q + 0.5 for q in range(100))


@dataclass(frozen=True)
class Slice:
    """One closed-loop run against one target."""

    requests: int
    seconds: float
    bytes: int
    errors: int
    quantiles: tuple[float, ...]  # latency in seconds at each of _QUANTILES
    cpu: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestStats:
    """Slices of one target pooled: totals, and latency percentiles of the pooled points."""

    requests: int
    seconds: float
    p50: float
    p90: float
    p99: float
    errors: int
    bytes: int
    cpu: Mapping[str, float] = field(default_factory=dict)  # CPU seconds per process

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @classmethod
    def pool(cls, slices: Sequence[Slice]) -> RequestStats:
        points = sorted((value, s.requests) for s in slices for value in s.quantiles if s.requests)
        total = sum(weight for _, weight in points)

        def quantile(q: float) -> float:
            seen = 0.0
            for value, weight in points:
                seen += weight
                if seen >= total * q / 100:
                    return value
            return float("nan")

        return cls(
            requests=sum(s.requests for s in slices),
            seconds=sum(s.seconds for s in slices),
            p50=quantile(50),
            p90=quantile(90),
            p99=quantile(99),
            errors=sum(s.errors for s in slices),
            bytes=sum(s.bytes for s in slices),
            cpu={key: sum(s.cpu.get(key, 0.0) for s in slices) for key in slices[0].cpu},
        )


_WRK_SCRIPT = """\
local paths = {%(paths)s}
local quantiles = {%(quantiles)s}
local i = 0
%(headers)s
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  local q = {}
  for k, p in ipairs(quantiles) do q[k] = string.format("%%d", latency:percentile(p)) end
  io.write(string.format(
    "BENCHJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"bytes\\": %%d, " ..
    "\\"errors\\": %%d, \\"quantiles_us\\": [%%s]}\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout, table.concat(q, ", ")))
end
"""


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrk(urls: Sequence[str], headers: Mapping[str, str], concurrency: int, duration: int) -> Slice:
    base = urlsplit(urls[0])
    paths = []
    for url in urls:
        parts = urlsplit(url)
        if parts.netloc != base.netloc:
            raise ValueError("wrk: all URLs must share one host")
        paths.append(parts.path + (f"?{parts.query}" if parts.query else ""))
    script = _WRK_SCRIPT % {
        "paths": ", ".join(_lua(p) for p in paths),
        "quantiles": ", ".join(map(str, _QUANTILES)),
        "headers": "\n".join(f"wrk.headers[{_lua(k)}] = {_lua(v)}" for k, v in headers.items()),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-") as file:
        file.write(script)
        file.flush()
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "30s"]
        command += ["-s", file.name, f"{base.scheme}://{base.netloc}/"]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    return Slice(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        bytes=data["bytes"],
        errors=data["errors"],
        quantiles=tuple(us / 1e6 for us in data["quantiles_us"]),
    )


def _httpx_requests(
    urls: Sequence[str], headers: Mapping[str, str], concurrency: int, duration: int
) -> Slice:
    spec = {"mode": "requests", "urls": list(urls), "headers": dict(headers)}
    spec |= {"concurrency": concurrency, "duration": duration}
    data = _loadgen(spec, timeout=duration + 120)
    latencies = data["latencies"]
    assert isinstance(latencies, list)
    return Slice(
        requests=len(latencies),
        seconds=float(data["seconds"]),  # type: ignore[arg-type]
        bytes=int(data["bytes"]),  # type: ignore[call-overload]
        errors=int(data["errors"]),  # type: ignore[call-overload]
        quantiles=tuple(percentile(latencies, q) for q in _QUANTILES),
    )


def request_rates(
    client: str,
    targets: Mapping[str, Sequence[str]],
    headers: Mapping[str, str],
    *,
    concurrency: int,
    slices: int,
    slice_seconds: int,
    warmup_seconds: int,
    meters: Mapping[str, Mapping[str, CpuMeter]] | None = None,
) -> dict[str, RequestStats]:
    """Closed loops of ``concurrency`` connections cycling through each target's URLs.

    Each target gets ``slices`` runs of ``slice_seconds``, interleaved across targets after one
    warm-up run each. Every run opens new connections, and the pause while the other targets
    run lets pooled upstream connections expire (Orthanc drops them after 1 s idle): one
    unlucky connection cannot decide a target's figure. ``meters`` measure CPU per run.
    """
    run: Callable[..., Slice] = _wrk if client == "wrk" else _httpx_requests
    meters = meters or {}
    out: dict[str, list[Slice]] = {name: [] for name in targets}
    if warmup_seconds > 0:
        for urls in targets.values():
            run(urls, headers, concurrency, warmup_seconds)
    for _ in range(slices):
        for name, urls in targets.items():
            target_meters = meters.get(name, {})
            before = {key: m.seconds() for key, m in target_meters.items()}
            piece = run(urls, headers, concurrency, slice_seconds)
            cpu = {key: m.seconds() - before[key] for key, m in target_meters.items()}
            out[name].append(Slice(**{**piece.__dict__, "cpu": cpu}))
    return {name: RequestStats.pool(pieces) for name, pieces in out.items()}


# -- latency at c=1, interleaved per request -----------------------------------------------


class _KeptAlive:
    """One HTTP/1.1 keep-alive connection on a blocking socket: GET, read the whole answer.

    The instrument of the interleaved latency runs: at c=1 it runs only between requests, never
    beside the server's work, and costs every target the same. It reads Content-Length, chunked
    and EOF-framed answers (it reconnects after the last kind). A connection the server closed
    while it was idle (Orthanc after 1 s, when a round takes longer than that) is opened again
    and counted in ``reopened``.
    """

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        self._address = (parts.hostname or "127.0.0.1", parts.port or 80)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f" HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n".encode("latin-1")
        self._sock: socket.socket | None = None
        self._buffer = b""
        self.reopened = 0

    def connect(self) -> None:
        self.close()
        self._sock = socket.create_connection(self._address, timeout=120)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buffer = None, b""

    def _fill(self) -> bool:
        assert self._sock is not None
        data = self._sock.recv(1 << 20)
        self._buffer += data
        return bool(data)

    def _take(self, size: int) -> None:
        while len(self._buffer) < size:
            if not self._fill():
                raise ConnectionError("connection closed in the middle of an answer")
        self._buffer = self._buffer[size:]

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if not self._fill():
                raise ConnectionError("connection closed in the middle of an answer")
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line

    def _open(self) -> bool:
        """Whether the kept-alive connection is still open (nothing to read: no EOF)."""
        assert self._sock is not None
        if not select.select([self._sock], [], [], 0)[0]:
            return True
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False

    def _request(self, target: str) -> bytes:
        """Send the GET, on a new connection if there is none; return the status line."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.sendall(b"GET " + target.encode("latin-1") + self._head)
        return self._line()

    def get(self, target: str) -> int:
        """GET ``target`` (path and query); return the body's size. Status must be 200."""
        if self._sock is not None and not self._open():
            self.close()
            self.reopened += 1
        reused = self._sock is not None
        try:
            status = self._request(target)
        except ConnectionError:
            if not reused:
                raise
            self.close()  # the server closed it between the check and the request
            self.reopened += 1
            status = self._request(target)
        fields: dict[bytes, bytes] = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if b" 200 " not in status + b" ":
            raise RuntimeError(f"GET {target}: {status.decode('latin-1', 'replace')}")
        if b"content-length" in fields:
            size = int(fields[b"content-length"])
            self._take(size)
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            size = 0
            while chunk := int(self._line().split(b";")[0], 16):
                self._take(chunk + 2)
                size += chunk
            while self._line():  # trailers, then the empty line
                pass
        else:  # the body ends at EOF
            while self._fill():
                pass
            size = len(self._buffer)
            self.close()
        if fields.get(b"connection", b"").lower() == b"close":
            self.close()
        return size


@dataclass(frozen=True)
class PairedStats:
    """An interleaved latency run: every target's stats, and what each adds to a reference.

    ``added`` is, per target, the median over rounds of (its latency - the reference's latency
    in the same round): the reference's own moment-to-moment variation cancels out of it.
    """

    stats: Mapping[str, RequestStats]
    added: Mapping[str, float]  # seconds, median of the paired differences
    rounds: int  # measured
    #: per target, measured requests that had to open a new connection because the server
    #: closed the kept-alive one while it was idle (rounds longer than its keep-alive timeout)
    reopened: Mapping[str, int] = field(default_factory=dict)


def interleaved_latency(
    targets: Mapping[str, str],
    headers: Mapping[str, str],
    *,
    rounds: int,
    warmup: int = 5,
    reconnect_every: int = 25,
    upstream_idle: float = 1.2,
    reference: str = "direct",
    meters: Mapping[str, Mapping[str, CpuMeter]] | None = None,
    target_headers: Mapping[str, Mapping[str, str]] | None = None,
    seconds: float | None = None,
) -> PairedStats:
    """One request per target per round, targets in turn, one kept-alive connection each.

    Orthanc's time for a QIDO moves by 20-30 ms between moments (the run queue of a shared
    machine) and between its threads (one connection's thread used twice the CPU of the
    others, for seconds), so targets measured one after another on one connection each (wrk
    slices) compare moments and threads, not hops. Here every target samples the same moments:
    the order rotates each round. Every ``reconnect_every`` rounds every connection closes and
    nothing is sent for ``upstream_idle`` seconds, past Orthanc's 1 s keep-alive: the
    connections of nginx and the proxy to Orthanc close too, and every target goes on with new
    Orthanc threads. ``meters`` are read around each request: each target's own CPU.
    ``target_headers`` are added to ``headers`` on their target's requests (a user's token).
    With ``seconds``, the run stops before ``rounds`` after the first round that ends that long
    after the warm-up (pauses included): slow requests get fewer rounds.
    """
    meters = meters or {}
    target_headers = target_headers or {}
    names = list(targets)
    clients = {
        name: _KeptAlive(url, {**headers, **target_headers.get(name, {})})
        for name, url in targets.items()
    }
    paths = {}
    for name, url in targets.items():
        parts = urlsplit(url)
        paths[name] = parts.path + (f"?{parts.query}" if parts.query else "")
    latencies: dict[str, list[float]] = {name: [] for name in names}
    sizes = dict.fromkeys(names, 0)
    cpu: dict[str, dict[str, float]] = {name: {} for name in names}
    deadline = math.inf
    try:
        for index in range(warmup + rounds):
            if time.monotonic() >= deadline:
                break
            if index % reconnect_every == 0:
                for client in clients.values():
                    client.close()
                if index:
                    time.sleep(upstream_idle)
            if index == warmup:
                for client in clients.values():
                    client.reopened = 0
                if seconds is not None:
                    deadline = time.monotonic() + seconds
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                target_meters = meters.get(name, {})
                before = {key: m.seconds() for key, m in target_meters.items()}
                start = time.perf_counter()
                size = clients[name].get(paths[name])
                elapsed = time.perf_counter() - start
                if index < warmup:
                    continue
                for key, meter in target_meters.items():
                    cpu[name][key] = cpu[name].get(key, 0.0) + meter.seconds() - before[key]
                latencies[name].append(elapsed)
                sizes[name] += size
    finally:
        for client in clients.values():
            client.close()
    stats = {
        name: RequestStats(
            requests=len(values),
            seconds=sum(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            errors=0,
            bytes=sizes[name],
            cpu=cpu[name],
        )
        for name, values in latencies.items()
    }
    added = {}
    if reference in latencies:
        base = latencies[reference]
        for name, values in latencies.items():
            if name != reference:
                added[name] = percentile([a - b for a, b in zip(values, base, strict=True)], 50)
    reopened = {name: client.reopened for name, client in clients.items()}
    return PairedStats(stats, added, len(latencies[names[0]]), reopened)


# -- memory ----------------------------------------------------------------------------------


class RssSampler:
    """Samples a process's resident memory every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def rss(self) -> int:
        return resident_memory(self.pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.rss())

    def baseline(self, seconds: float = 0.5) -> int:
        """Median RSS over ``seconds`` of idle sampling."""
        values = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            values.append(self.rss())
            time.sleep(self.interval)
        return int(statistics.median(values))


def slow_read(
    url: str, headers: Mapping[str, str], *, rate: float, chunk: int = 16384
) -> tuple[int, float]:
    """GET ``url`` over a raw socket and read it at ``rate`` bytes/s in ``chunk``-byte reads.

    A small receive buffer keeps the kernel from soaking up the answer for us, so the server
    sees a genuinely slow client. Returns (bytes read including headers, seconds).
    """
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
    request += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(60)
        sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
        sock.sendall(request.encode("latin-1"))
        start = time.monotonic()
        total = 0
        head = b""
        while True:
            data = sock.recv(chunk)
            if not data:
                break
            if total < 64:
                head += data
            total += len(data)
            ahead = total / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        elapsed = time.monotonic() - start
    status = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    if " 200 " not in status + " ":
        raise RuntimeError(f"slow read of {url}: {status!r}")
    return total, elapsed
