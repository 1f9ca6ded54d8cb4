"""The demo: a real Orthanc with sample data, and the proxy in front of it.

    python3 scripts/demo.py           # serve until Ctrl-C
    python3 scripts/demo.py --once    # start, try the printed examples, stop

Everything lives in ./demo/ (git-ignored). Needs Orthanc (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dicomweb_client.api import DICOMwebClient

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, generate_samples

ROOT = Path(__file__).resolve().parent.parent


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
            "auth": {"enabled": False},
            "mapping": {"backend": "identity"},
            "access": {"backend": "allow_all"},
            "upstream": {"url": orthanc.dicomweb_url},
        }
        with ProxyServer(args.dir / "proxy", settings, port=args.port) as proxy:
            base = proxy.dicomweb_url
            study = samples.small_studies[0]
            series = study.series[0]
            curl = f"curl -s '{base}/studies?PatientID=HARN0000*&includefield=StudyDescription'"
            python = (
                f'python3 -c "from dicomweb_client.api import DICOMwebClient; '
                f"c = DICOMwebClient('{base}'); "
                f"print([ds.SOPInstanceUID for ds in c.retrieve_series('{study.uid}', "
                f"'{series.uid}')])\""
            )
            print(f"\nThe proxy serves DICOMweb at {base} (config: {proxy.config_path})")
            print("Authentication is off in this demo: every caller sees everything.\n")
            print("Search studies:")
            print(f"  {curl}\n")
            print("Retrieve a series with dicomweb-client:")
            print(f"  {python}\n")
            print(f"Logs: {proxy.log_path}, {orthanc.log_path}")
            _try_examples(base, curl, study.uid, series.uid, len(series.instances))
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


def _try_examples(base: str, curl: str, study: str, series: str, instances: int) -> None:
    """Run the printed examples, so that a broken demo says so at once."""
    found = subprocess.run(shlex.split(curl), capture_output=True, text=True, check=True)
    if '"0020000D"' not in found.stdout:
        raise SystemExit(f"the curl example found nothing:\n{found.stdout[:500]}")
    datasets = DICOMwebClient(base).retrieve_series(study, series)
    if len(datasets) != instances:
        raise SystemExit(f"retrieve_series gave {len(datasets)} instances, not {instances}")
    print(f"(checked: the search answers, and the series retrieves {instances} instances)")


if __name__ == "__main__":
    sys.exit(main())
