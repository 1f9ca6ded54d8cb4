"""The Shanoir-NG backends through the full stack, against Orthanc directly.

    python bench/shanoir.py [--studies 400] [--requests 60]

Issue 14: a QIDO page of 100 examinations must cost at most 2 Shanoir calls and 1 PACS search
when the caches are warm (Shanoir's own wrapper makes one PACS search per examination), with
exact paging. The archive: ``--studies`` one-instance studies in a real Orthanc, each an
examination of a loopback Shanoir API (``tests/support/shanoir.py``); ``few`` may read 100 of
them (the search is narrowed upstream with their UIDs), ``many`` every one (above
``[access] inject_max``: the upstream is paged through and filtered). The proxy runs as a
process with authentication, both ``shanoir`` backends (``credentials = "user"``) and
translation; a second such proxy reaches Orthanc through a small forwarder that counts the PACS
requests (the first, measured, reaches Orthanc directly, as the direct client does).

Printed: per workload, Shanoir calls and PACS requests per request (warm), and the latency
ratio (direct median / proxy median). The bench always exits 0 once it has measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from joserfc.jwk import RSAKey

ROOT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT_DIR))

from tests.support.shanoir import (  # noqa: E402
    Examination,
    Member,
    ShanoirWorld,
    Study,
    serving,
)

from access import _specs, _upload  # noqa: E402
from shanoir_dicomweb_proxy import Settings  # noqa: E402
from shanoir_dicomweb_proxy._auth import dev_token  # noqa: E402
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer  # noqa: E402

ROOT = "1.4.9.12.34.1.8527"
ISSUER = "https://idp.bench/realms/shanoir-ng"
RIGHTS = ("CAN_SEE_ALL",)


class _Counter(ThreadingHTTPServer):
    """A forwarding HTTP proxy in front of Orthanc that counts the requests it forwards."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.target = target
        self.count = 0
        self.lock = threading.Lock()
        self.client = httpx.Client(base_url=target, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _Forward(BaseHTTPRequestHandler):
    server: _Counter
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.server.lock:
            self.server.count += 1
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "host")}
        answer = self.server.client.get(self.path, headers=headers)
        body = answer.content
        self.send_response(answer.status_code)
        for name in ("content-type",):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _latencies(url: str, headers: dict[str, str], count: int) -> list[float]:
    seconds = []
    with httpx.Client(timeout=60, headers=headers) as client:
        for _ in range(count):
            started = time.perf_counter()
            answer = client.get(url)
            answer.raise_for_status()
            seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, OrthancServer(Path(scratch) / "orthanc") as pacs:
        folder = Path(scratch)
        archive, specs = _specs(args.studies)
        asyncio.run(_upload(pacs.url, specs, concurrency=4))
        studies = sorted({spec.study_uid for spec in specs})
        key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
        keys = folder / "keys.json"
        keys.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
        exams = [
            Examination(1000 + n, 1 if n < 100 else 2, 1, n, f"S-{n}", uid)
            for n, uid in enumerate(studies)
        ]
        world = ShanoirWorld(
            issuer=ISSUER,
            jwks={"keys": [key.as_dict(private=False)]},
            studies=[
                Study(
                    1, "first hundred", [Member(1, ("CAN_SEE_ALL",)), Member(2, ("CAN_SEE_ALL",))]
                ),
                Study(2, "the rest", [Member(2, RIGHTS)]),
            ],
            examinations=exams,
        )
        counter = _Counter(pacs.url)
        threading.Thread(target=counter.serve_forever, args=(0.01,), daemon=True).start()
        with serving(world) as shanoir:
            settings = {
                "upstream": {"url": counter.url},
                "auth": {"jwks_file": str(keys), "issuer": ISSUER},
                "mapping": {"backend": "shanoir", "study_root": ROOT, "series_root": ROOT},
                "access": {"backend": "shanoir"},
                "shanoir": {"url": shanoir.url, "cache_ttl": 600},
                "logging": {"audit_log": "", "access_log": False},
            }
            tokens = {
                name: dev_token(
                    Settings.from_dict(settings),
                    name,
                    {"userId": user, "realm_access": {"roles": ["ROLE_USER"]}},
                    ttl=3600,
                )
                for name, user in (("few", 1), ("many", 2))
            }
            direct_settings = {**settings, "upstream": {"url": pacs.dicomweb_url}}
            with (
                ProxyServer(folder / "proxy", direct_settings) as proxy,
                ProxyServer(folder / "counted", settings) as counted,
            ):
                print(f"{len(studies)} studies in Orthanc {pacs.url}; proxy {proxy.dicomweb_url}")
                print(f"{'workload':<28} {'shanoir/req':>11} {'pacs/req':>9} "
                      f"{'direct ms':>9} {'proxy ms':>9} {'ratio':>6}")  # fmt: skip
                query = "/studies?limit=100&offset=20"
                direct = statistics.median(_latencies(pacs.dicomweb_url + query, {}, args.requests))
                for name in ("few", "many"):
                    headers = {"authorization": f"Bearer {tokens[name]}"}
                    url, counted_url = proxy.dicomweb_url + query, counted.dicomweb_url + query
                    _latencies(counted_url, headers, 3)  # warm the caches
                    shanoir_before, pacs_before = len(world.calls), counter.count
                    _latencies(counted_url, headers, args.requests)
                    shanoir_calls = (len(world.calls) - shanoir_before) / args.requests
                    pacs_calls = (counter.count - pacs_before) / args.requests
                    _latencies(url, headers, 3)
                    median = statistics.median(_latencies(url, headers, args.requests))
                    rows = len(httpx.get(url, headers=headers, timeout=60).json())
                    print(
                        f"{name + f' ({rows} rows)':<28} {shanoir_calls:>11.2f} "
                        f"{pacs_calls:>9.2f} {direct * 1000:>9.1f} {median * 1000:>9.1f} "
                        f"{direct / median:>6.2f}"
                    )
        counter.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
