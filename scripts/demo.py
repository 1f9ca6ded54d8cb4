"""The demo: a real Orthanc with sample data, and the proxy in front of it.

    python3 scripts/demo.py           # serve until Ctrl-C
    python3 scripts/demo.py --once    # start, try the printed examples, stop

Everything lives in ./demo/ (git-ignored). Needs Orthanc (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from dicomweb_client.api import DICOMwebClient
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import (
    OrthancServer,
    ProxyServer,
    SampleStudy,
    dump_toml,
    generate_samples,
)

ROOT = Path(__file__).resolve().parent.parent
ROOTS = {"study_root": "1.4.9.12.34.1.8527", "series_root": "1.4.9.12.34.2.8527"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="try the examples, then stop")
    parser.add_argument("--port", type=int, default=8080, help="the proxy's port")
    parser.add_argument("--dir", type=Path, default=ROOT / "demo", help="working directory")
    args = parser.parse_args()

    print("generating sample DICOM data with pydicom ...", flush=True)
    samples = generate_samples(args.dir / "samples")
    with OrthancServer(args.dir / "orthanc") as orthanc:
        loaded = orthanc.load(samples.files)
        print(
            f"Orthanc {orthanc.dicomweb_url}: {loaded} instances in {len(samples.studies)} studies"
        )
        settings = {
            # Tokens are checked against a local key: `dev-token` signs with it, no IdP needed.
            "auth": {"jwks_file": str(_signing_key(args.dir)), "audience": ["dicomweb-proxy"]},
            # Clients see examination and acquisition IDs, assigned by `store sync` below.
            "mapping": {"backend": "sqlite", **ROOTS},
            "store": {"path": str(args.dir / "store.sqlite3")},
            # Grants in the same store: alice (userId 1) may read one examination, below.
            "access": {"backend": "sqlite"},
            # Orthanc stores nothing of an upload cut short: translated uploads can stream.
            "upstream": {"url": orthanc.dicomweb_url, "stream_uploads": True},
        }
        proxy = ProxyServer(args.dir / "proxy", settings, port=args.port)
        proxy.config_path.parent.mkdir(parents=True, exist_ok=True)
        proxy.config_path.write_text(dump_toml(proxy.settings))
        cli = Path(sys.executable).parent / "shanoir-dicomweb-proxy"
        config = ["-c", str(proxy.config_path)]
        _run([str(cli), "store", "sync", *config])
        # Two users with different grants: alice reads one examination, bob three others.
        store = args.dir / "store.sqlite3"
        alice = [_public_uids(store, study) for study in samples.small_studies[:1]]
        bob = [_public_uids(store, study) for study in samples.small_studies[1:4]]
        for user, uids in (("1", alice), ("2", bob)):
            for study, _ in uids:
                exam = study.rsplit(".", 1)[1]
                _run(
                    [
                        str(cli),
                        "store",
                        "grant",
                        *config,
                        "--user",
                        user,
                        "--study",
                        exam,
                        "--action",
                        "read",
                    ]
                )
        with proxy:
            demo = Demo(proxy, cli, alice, bob)
            demo.show()
            instances = len(samples.small_studies[0].series[0].instances)
            demo.check(instances)
            print(f"Logs: {proxy.log_path}, {orthanc.log_path}")
            if args.once:
                return 0
            print("\nServing; press Ctrl-C to stop.", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    return 0


def _public_uids(store_path: Path, study: SampleStudy) -> tuple[str, str]:
    """The public UIDs of a sample study and of its first series, from the synced store."""
    with SqliteStore(store_path) as store:
        entry = next(e for e in store.entries() if e.study_uid == study.uid)
    acquisition = next(a for a in entry.acquisitions if a.series_uid == study.series[0].uid)
    return (
        f"{ROOTS['study_root']}.{entry.exam_id}",
        f"{ROOTS['series_root']}.{acquisition.acquisition_id}",
    )


def _signing_key(directory: Path) -> Path:
    """A private JWKS for the demo (made once): the proxy trusts it, dev-token signs with it."""
    path = directory / "demo-keys.json"
    if not path.exists():
        key = RSAKey.generate_key(2048, parameters={"kid": "demo"}, private=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
        path.chmod(0o600)
    return path


def _run(command: list[str]) -> None:
    print(f"$ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)


class Demo:
    """What the demo prints, and the check that it all works as printed."""

    def __init__(
        self,
        proxy: ProxyServer,
        cli: Path,
        alice: list[tuple[str, str]],
        bob: list[tuple[str, str]],
    ) -> None:
        self.base = proxy.dicomweb_url
        self.root = proxy.url
        self.alice = alice
        self.bob = bob
        mint = f"{cli} dev-token -c {proxy.config_path}"
        self.mints = {
            "ALICE": f"{mint} --sub alice --claim userId=1",
            "BOB": f"{mint} --sub bob --claim userId=2",
        }
        self.search = {
            user: f'curl -s -H "Authorization: Bearer ${user}" '
            f"'{self.base}/studies?includefield=StudyDescription'"
            for user in self.mints
        }
        foreign = bob[0][0]
        self.denied = (
            f'curl -s -o /dev/null -w "%{{http_code}}\\n" -H "Authorization: Bearer $ALICE" '
            f"'{self.base}/studies/{foreign}/metadata'"
        )
        study, series = alice[0]
        self.python = (
            f'{sys.executable} -c "import os; from dicomweb_client.api import DICOMwebClient; '
            f"c = DICOMwebClient('{self.base}', "
            "headers={'Authorization': 'Bearer ' + os.environ['ALICE']}); "
            f"print([(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in "
            f"c.retrieve_series('{study}', '{series}')])\""
        )

    def show(self) -> None:
        exams = {
            user: ", ".join(s.rsplit(".", 1)[1] for s, _ in uids)
            for user, uids in (("alice", self.alice), ("bob", self.bob))
        }
        print(f"\nThe proxy serves DICOMweb at {self.base}")
        print("Every request needs a bearer token. Two users, tokens signed with the demo's key:")
        for variable, mint in self.mints.items():
            print(f"  export {variable}=$({mint})")
        print(
            f"alice (userId 1) may read examination {exams['alice']}; "
            f"bob (userId 2) examinations {exams['bob']}.\n"
        )
        print(f"Search studies: alice sees {len(self.alice)}, bob {len(self.bob)}:")
        for command in self.search.values():
            print(f"  {command}")
        print("\nbob's examination is a 404 for alice, like one that does not exist:")
        print(f"  {self.denied}")
        print("\nRetrieve alice's series with dicomweb-client: every UID it shows is public")
        print(f"  {self.python}\n")
        print(f"Without a token: curl -si {self.base}/studies  (401)")
        print(
            f"Operations, no token needed: curl -s {self.root}/readyz ; curl -s {self.root}/metrics"
        )

    def check(self, instances: int) -> None:
        """Run the printed examples, so that a broken demo says so at once."""
        env = dict(os.environ)
        for variable, mint in self.mints.items():
            minted = subprocess.run(shlex.split(mint), capture_output=True, text=True, check=True)
            env[variable] = minted.stdout.strip()
        for user, uids in (("ALICE", self.alice), ("BOB", self.bob)):
            found = _sh(self.search[user], env)
            shown = sorted(row["0020000D"]["Value"][0] for row in json.loads(found or "[]"))
            if shown != sorted(study for study, _ in uids):
                raise SystemExit(
                    f"{user}'s search did not show exactly the granted studies:\n{found[:500]}"
                )
        if (status := _sh(self.denied, env).strip()) != "404":
            raise SystemExit(f"alice asking for bob's examination got {status}, not 404")
        if httpx.get(f"{self.base}/studies").status_code != 401:
            raise SystemExit("a request without a token was not refused")
        ready = httpx.get(f"{self.root}/readyz")
        if ready.status_code != 200:
            raise SystemExit(f"the proxy is not ready: {ready.text}")
        study, series = self.alice[0]
        client = DICOMwebClient(self.base, headers={"Authorization": f"Bearer {env['ALICE']}"})
        datasets = client.retrieve_series(study, series)
        if len(datasets) != instances:
            raise SystemExit(f"retrieve_series gave {len(datasets)} instances, not {instances}")
        shown_uids = {(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in datasets}
        if shown_uids != {(study, series)}:
            raise SystemExit(
                f"retrieve_series showed other UIDs than the public ones: {shown_uids}"
            )
        print(
            f"(checked: ready; no token gets 401; alice's search shows her "
            f"{len(self.alice)} study and bob's his {len(self.bob)}; bob's examination is a 404 "
            "for alice; the series "
            f"retrieves {instances} instances with public UIDs only)"
        )


def _sh(command: str, env: dict[str, str]) -> str:
    return subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, check=True, env=env
    ).stdout


if __name__ == "__main__":
    sys.exit(main())
