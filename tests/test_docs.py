"""The documentation written from the code (the configuration reference), and the examples."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy import (
    ALL,
    AccessPolicy,
    IdentifierMap,
    Principal,
    SeriesEntry,
    Settings,
    UidFormatter,
    create_app,
)
from shanoir_dicomweb_proxy import _config_reference as reference
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy.testing import free_port

ROOT = Path(__file__).parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"

# --- the configuration reference -------------------------------------------------------------


def test_configuration_reference_is_current() -> None:
    document = CONFIGURATION.read_text(encoding="utf-8")
    wanted = reference.replace_generated(document, reference.config_reference())
    assert document == wanted, "docs/configuration.md is out of date: run scripts/docs.py"


def test_every_key_has_a_comment() -> None:
    undocumented = [
        f"[{section.name}] {key.name}"
        for section in reference.sections()
        for key in section.keys
        if not key.doc.strip()
    ]
    assert undocumented == [], "give these fields a #: comment in _config.py"
    assert all(section.doc.strip() for section in reference.sections())


def _flatten(data: dict[str, Any], prefix: str = "") -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    for name, value in data.items():
        if isinstance(value, dict):
            keys |= _flatten(value, f"{prefix}.{name}" if prefix else name)
        else:
            keys.add((prefix, name))
    return keys


def test_every_key_of_a_file_is_in_the_reference() -> None:
    settings = Settings.from_dict(
        {
            "upstream": {"url": "http://pacs/dicom-web"},
            "mapping": {"study_root": "1.2.3"},
            "auth": {
                "issuer": "https://idp.example.org/realms/r",
                "introspection": {
                    "url": "https://idp.example.org/introspect",
                    "client_id": "proxy",
                    "client_secret": "s",
                },
            },
        }
    )
    shown = {(s.name, k.name) for s in reference.sections() for k in s.keys}
    assert _flatten(settings.to_dict()) == shown


def test_reference_rows() -> None:
    text = reference.config_reference()
    assert "| `url` | string | *required* |" in text
    assert '| `password` | string, secret | `""` |' in text
    assert '| `unmapped_series` | one of `"expose"`, `"hide"` | `"expose"` |' in text
    assert '| `admin_roles` | list of strings | `["ROLE_ADMIN"]` |' in text
    assert "| `deny_status` | one of `403`, `404` | `404` |" in text
    assert '| `jwks_file` | path | `""` |' in text
    assert "| `max_upload_bytes` | integer | `4294967296` |" in text
    assert "| `read_timeout` | number | `300.0` |" in text
    assert "### `[upstream.auth]`" in text and "### `[auth.introspection]`" in text
    # RST literals of older comments come out as Markdown code.
    assert "``" not in text


def test_sections_in_file_order() -> None:
    names = [s.name for s in reference.sections()]
    assert names[:4] == ["server", "upstream", "upstream.auth", "auth"]
    assert names[-1] == "logging"
    presence = {s.name: s.presence for s in reference.sections()}
    assert presence["upstream"] == "required"
    assert presence["auth.introspection"] == "optional"
    assert presence["server"] == "defaults"


def test_a_key_without_comment_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "_comments", lambda cls: {})
    with pytest.raises(ValueError, match=r"\[server\] bind, \[server\] base_path"):
        reference.config_reference()


@dataclasses.dataclass
class _Commented:
    #: The first line,
    #: and the second.
    documented: int = 1
    # a plain comment is not documentation
    plain: int = 2
    #: Above a blank line is not above the field.

    detached: int = 3


def test_comments_are_read_from_the_source() -> None:
    assert reference._comments(_Commented) == {
        "documented": "The first line, and the second.",
        "plain": "",
        "detached": "",
    }


def test_replace_generated_keeps_the_prose() -> None:
    document = f"intro\n{reference.BEGIN}\nold\n{reference.END}\noutro\n"
    assert reference.replace_generated(document, "new\n") == (
        f"intro\n{reference.BEGIN}\n\nnew\n\n{reference.END}\noutro\n"
    )
    with pytest.raises(ValueError, match="markers"):
        reference.replace_generated("no markers here", "new")


# --- examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_example_settings_load(path: Path) -> None:
    Settings.from_toml(path)


def test_dcm4chee_keycloak_example() -> None:
    settings = Settings.from_toml(ROOT / "examples" / "dcm4chee-keycloak.toml")
    assert settings.upstream.url.endswith("/dcm4chee-arc/aets/DCM4CHEE/rs")
    assert settings.upstream.auth.type == "client_credentials"
    assert settings.auth.enabled and settings.auth.issuer.endswith("/realms/shanoir-ng")
    assert settings.auth.user_claim == "userId"
    assert settings.server.public_url.startswith("https://")
    assert (settings.mapping.backend, settings.access.backend) == ("http", "http")


def test_shanoir_example() -> None:
    settings = Settings.from_toml(ROOT / "examples" / "shanoir.toml")
    assert (settings.mapping.backend, settings.access.backend) == ("shanoir", "shanoir")
    assert settings.mapping.study_root == settings.mapping.series_root == "1.4.9.12.34.1.8527"
    assert settings.shanoir.credentials == "user" and settings.auth.user_claim == "userId"
    app = create_app(settings)  # nothing is asked of Shanoir or the PACS before a request
    assert app.backends is not None and app.backends.shanoir is not None
    assert app.probes.shanoir is app.backends.shanoir
    assert app.backends.exam_series is not None and app.backends.exam_subjects is not None


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def custom() -> ModuleType:
    return _load_example("custom_backend.py")


def _principal(subject: str, user_id: str | None) -> Principal:
    return Principal(
        subject=subject,
        user_id=user_id,
        username=subject,
        roles=frozenset(),
        claims={},
        expires_at=None,
        is_admin=False,
        token_id="0" * 16,
    )


async def test_custom_identifier_map(custom: ModuleType) -> None:
    identifiers = custom.PlatformIdentifiers(custom.EXAMINATIONS)
    assert isinstance(identifiers, IdentifierMap)
    study = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    series = "1.2.840.113619.2.55.3.604688119.969.1268071029.321"
    assert await identifiers.studies_by_uid([study, "1.2.3"]) == {study: 42}
    assert await identifiers.studies_by_id([42, 99]) == {42: study}
    entry = SeriesEntry(acquisition_id=7, exam_id=42, series_uid=series)
    assert await identifiers.series_by_uid([series, "1.2.3"]) == {series: entry}
    assert await identifiers.series_by_id([7, 9]) == {7: entry}
    assert await identifiers.series_by_id([]) == {}


async def test_custom_access_policy(custom: ModuleType) -> None:
    access = custom.PlatformAccess(custom.GRANTS)
    assert isinstance(access, AccessPolicy)
    alice = _principal("f1d2c3b4", "7")
    assert await access.visible(alice, "read") == frozenset({42})  # download covers read
    assert await access.allowed(alice, "download", [42, 43]) == frozenset({42})
    assert await access.allowed(alice, "write", [43]) == frozenset()
    service = _principal("service-account-viewer", None)
    assert await access.visible(service, "read") is ALL
    assert await access.allowed(service, "read", [42, 43]) == frozenset({42, 43})
    assert await access.allowed(service, "download", [42]) == frozenset()
    stranger = _principal("someone", "8")
    assert await access.visible(stranger, "read") == frozenset()


async def test_custom_backend_wired_into_the_proxy(custom: ModuleType, tmp_path: Path) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    settings = Settings.from_dict(
        {
            "upstream": {"url": f"http://127.0.0.1:{free_port()}/dicom-web"},
            "auth": {"jwks_file": str(keys), "audience": "dicomweb-proxy"},
            "mapping": {"study_root": "1.4.9.12.34.1.8527", "series_root": "1.4.9.12.34.2.8527"},
            "logging": {"audit_log": str(tmp_path / "audit.jsonl")},
        }
    )
    proxy = custom.create_proxy(settings)
    formatter = UidFormatter(settings.mapping.study_root, settings.mapping.series_root)
    token = dev_token(settings, "f1d2c3b4", {"userId": 7}, ttl=300)
    headers = {"Authorization": f"Bearer {token}"}
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://h")
    async with proxy, client:
        # Examination 43 is not granted: refused before the (unreachable) PACS is asked.
        denied = await client.get(
            f"/dicomweb/studies/{formatter.study_uid(43)}/metadata", headers=headers
        )
        assert denied.status_code == 404
        # Examination 42 is: the request goes on to the PACS, which cannot be reached here.
        allowed = await client.get(
            f"/dicomweb/studies/{formatter.study_uid(42)}/metadata", headers=headers
        )
        assert allowed.status_code == 502
        assert (
            await client.get(f"/dicomweb/studies/{formatter.study_uid(42)}/metadata")
        ).status_code == 401
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(line["examinations"], line["decision"]) for line in lines] == [
        ([43], "deny"),
        ([42], "allow"),
    ]
    assert all(line["user_id"] == "7" for line in lines)
