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
            "upstream": {"url": orthanc.dicomweb_url},
        }
        proxy = ProxyServer(args.dir / "proxy", settings, port=args.port)
        proxy.config_path.parent.mkdir(parents=True, exist_ok=True)
        proxy.config_path.write_text(dump_toml(proxy.settings))
        cli = Path(sys.executable).parent / "shanoir-dicomweb-proxy"
        sync = [str(cli), "store", "sync", "-c", str(proxy.config_path)]
        print(f"$ {shlex.join(sync)}", flush=True)
        subprocess.run(sync, check=True)
        study, series = _public_uids(args.dir / "store.sqlite3", samples.small_studies[0])
        exam = study.rsplit(".", 1)[1]
        grant = [str(cli), "store", "grant", "-c", str(proxy.config_path)]
        grant += ["--user", "1", "--study", exam, "--action", "read"]
        print(f"$ {shlex.join(grant)}", flush=True)
        subprocess.run(grant, check=True)
        with proxy:
            base = proxy.dicomweb_url
            mint = f"{cli} dev-token -c {proxy.config_path} --sub alice --claim userId=1"
            curl = (
                'curl -s -H "Authorization: Bearer $TOKEN" '
                f"'{base}/studies?PatientID=HARN0000*&includefield=StudyDescription'"
            )
            python = (
                f'{sys.executable} -c "import os; from dicomweb_client.api import DICOMwebClient; '
                f"c = DICOMwebClient('{base}', "
                "headers={'Authorization': 'Bearer ' + os.environ['TOKEN']}); "
                f"print([(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in "
                f"c.retrieve_series('{study}', '{series}')])\""
            )
            print(f"\nThe proxy serves DICOMweb at {base} (config: {proxy.config_path})")
            print("Every request needs a bearer token; get one signed with the demo's key:")
            print(f"  export TOKEN=$({mint})\n")
            print("Search studies (alice sees the one examination she was granted):")
            print(f"  {curl}\n")
            print("Retrieve a series with dicomweb-client: every UID it shows is public")
            print(f"  {python}\n")
            print(f"Without a token: curl -si {base}/studies  (401)")
            print(f"Logs: {proxy.log_path}, {orthanc.log_path}")
            instances = len(samples.small_studies[0].series[0].instances)
            _try_examples(base, mint, curl, study, series, instances)
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


def _try_examples(base: str, mint: str, curl: str, study: str, series: str, instances: int) -> None:
    """Run the printed examples, so that a broken demo says so at once."""
    token = subprocess.run(shlex.split(mint), capture_output=True, text=True, check=True)
    env = {**os.environ, "TOKEN": token.stdout.strip()}
    found = subprocess.run(["sh", "-c", curl], capture_output=True, text=True, check=True, env=env)
    rows = json.loads(found.stdout or "[]")
    if [row["0020000D"]["Value"][0] for row in rows] != [study]:
        raise SystemExit(f"the search did not show exactly alice's study:\n{found.stdout[:500]}")
    if httpx.get(f"{base}/studies").status_code != 401:
        raise SystemExit("a request without a token was not refused")
    headers = {"Authorization": f"Bearer {env['TOKEN']}"}
    datasets = DICOMwebClient(base, headers=headers).retrieve_series(study, series)
    if len(datasets) != instances:
        raise SystemExit(f"retrieve_series gave {len(datasets)} instances, not {instances}")
    shown = {(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in datasets}
    if shown != {(study, series)}:
        raise SystemExit(f"retrieve_series showed other UIDs than the public ones: {shown}")
    print(
        f"(checked: no token gets 401; with one, the search answers and the series retrieves "
        f"{instances} instances, with public UIDs only; the search shows alice's study only)"
    )


if __name__ == "__main__":
    sys.exit(main())
