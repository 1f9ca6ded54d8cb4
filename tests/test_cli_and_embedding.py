"""The command line and the Python API, as users call them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy import ConfigError, Settings, create_app
from shanoir_dicomweb_proxy.testing import (
    OrthancServer,
    ProxyServer,
    SampleSet,
    dump_toml,
    free_port,
)

from .support.settings import CORE_SETTINGS

ROOT = Path(__file__).parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "shanoir_dicomweb_proxy", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _config(tmp_path: Path, **sections: object) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(dump_toml({**CORE_SETTINGS, **sections}))
    return path


def test_check_good_config(tmp_path: Path, orthanc: OrthancServer) -> None:
    result = _run("check", "-c", str(_config(tmp_path, upstream={"url": orthanc.dicomweb_url})))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "QIDO answered 200" in result.stdout
    assert result.stdout.strip().endswith("all checks passed")


def test_check_unreachable_upstream(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = _run("check", "-c", str(_config(tmp_path, upstream={"url": url})))
    assert result.returncode == 1
    assert "unreachable" in result.stdout


def test_misspelled_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[upstream]\nurl = "http://pacs/dicom-web"\nread_timout = 3\n')
    result = _run("check", "-c", str(path))
    assert result.returncode == 1  # check reports a bad file as a failed check
    assert "bad.toml" in result.stdout and "read_timout" in result.stdout
    assert "did you mean 'read_timeout'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    served = _run("serve", "-c", str(path))
    assert served.returncode == 2
    assert "did you mean 'read_timeout'" in served.stderr and "Traceback" not in served.stderr


def test_serve_refuses_what_it_cannot_enforce(tmp_path: Path) -> None:
    # The per-examination backends are not in this version: no silent fallback to "allow".
    path = tmp_path / "sqlite.toml"
    path.write_text(
        '[upstream]\nurl = "http://pacs/dicom-web"\n[auth]\nenabled = false\n'
        '[mapping]\nbackend = "identity"\n'
    )
    result = _run("serve", "-c", str(path), "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "[access] backend" in result.stderr and "Traceback" not in result.stderr


def test_missing_file(tmp_path: Path) -> None:
    result = _run("serve", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "nope.toml" in result.stderr


def test_create_app_checks_settings() -> None:
    settings = Settings.from_dict(
        {
            "upstream": {"url": "http://pacs/dicom-web"},
            "auth": {"enabled": False},
            "mapping": {"backend": "identity"},
            "access": {"backend": "sqlite"},
        }
    )
    with pytest.raises(ConfigError, match=r"\[access\] backend"):
        create_app(settings)


async def test_mounted_in_starlette(orthanc: OrthancServer, samples: SampleSet) -> None:
    spec = importlib.util.spec_from_file_location("mount", ROOT / "examples/mount_in_starlette.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mount_example"] = module
    spec.loader.exec_module(module)
    settings = Settings.from_dict({**CORE_SETTINGS, "upstream": {"url": orthanc.dicomweb_url}})
    app = module.build_app(settings)
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://host.test")
    # ASGITransport runs no lifespan: enter the host app's, which opens the proxy's client.
    async with app.router.lifespan_context(app), client:
        home = await client.get("/")
        assert home.json() == {"dicomweb": "http://host.test/pacs/dicomweb"}
        response = await client.get("/pacs/dicomweb/studies", params={"limit": "1"})
        assert response.status_code == 200
        url = response.json()[0]["00081190"]["Value"][0]
        assert url.startswith("http://host.test/pacs/dicomweb/studies/")
        assert (await client.get("/pacs/healthz")).status_code == 200
        assert (await client.get("/pacs/dicomweb/workitems")).status_code == 404


def test_healthz(proxy: ProxyServer) -> None:
    response = httpx.get(proxy.url + "/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def _keys(tmp_path: Path, *, private: bool) -> Path:
    key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [key.as_dict(private=private)]}))
    return path


def test_dev_token(tmp_path: Path, orthanc: OrthancServer) -> None:
    auth = {"jwks_file": str(_keys(tmp_path, private=True)), "audience": ["dicomweb-proxy"]}
    config = _config(tmp_path, upstream={"url": orthanc.dicomweb_url}, auth=auth)
    result = _run(
        "dev-token", "-c", str(config), "--sub", "alice", "--claim", "userId=7",
        "--claim", 'realm_access.roles=["ROLE_USER"]', "--claim", "site=Rennes",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = json.loads(jws.extract_compact(token.encode()).payload)
    assert claims["sub"] == "alice" and claims["aud"] == ["dicomweb-proxy"]
    assert claims["userId"] == 7 and claims["realm_access"] == {"roles": ["ROLE_USER"]}
    assert claims["site"] == "Rennes"
    checked = _run("check", "-c", str(config))
    assert checked.returncode == 0, checked.stdout
    assert ": 1 keys" in checked.stdout


def test_dev_token_needs_a_private_key(tmp_path: Path) -> None:
    auth = {"jwks_file": str(_keys(tmp_path, private=False))}
    config = _config(tmp_path, upstream={"url": "http://pacs/dicom-web"}, auth=auth)
    result = _run("dev-token", "-c", str(config), "--sub", "alice")
    assert result.returncode == 2
    assert "no private key" in result.stderr and "Traceback" not in result.stderr


def test_unreadable_jwks_file(tmp_path: Path) -> None:
    auth = {"jwks_file": str(tmp_path / "missing.json")}
    config = _config(tmp_path, upstream={"url": "http://pacs/dicom-web"}, auth=auth)
    result = _run("serve", "-c", str(config))
    assert result.returncode == 2
    assert "missing.json" in result.stderr and "Traceback" not in result.stderr


def test_check_reports_an_unreachable_issuer(tmp_path: Path, orthanc: OrthancServer) -> None:
    auth = {"issuer": f"http://127.0.0.1:{free_port()}/realms/x"}
    config = _config(tmp_path, upstream={"url": orthanc.dicomweb_url}, auth=auth)
    result = _run("check", "-c", str(config))
    assert result.returncode == 1
    assert "FAIL  issuer    http://127.0.0.1:" in result.stdout
    assert "cannot be reached" in result.stdout


def test_example_settings_load() -> None:
    settings = Settings.from_toml(ROOT / "examples/orthanc.toml")
    assert settings.upstream.url == "http://127.0.0.1:8042/dicom-web"
    assert not settings.auth.enabled
    create_app(settings)


def test_version_is_the_installed_one() -> None:
    from importlib.metadata import version

    import shanoir_dicomweb_proxy

    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.split() == ["shanoir-dicomweb-proxy", version("shanoir-dicomweb-proxy")]
    assert shanoir_dicomweb_proxy.__version__ == version("shanoir-dicomweb-proxy")
