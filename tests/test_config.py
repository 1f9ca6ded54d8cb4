from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from shanoir_dicomweb_proxy._config import (
    AccessSettings,
    AuthSettings,
    CorsSettings,
    IntrospectionSettings,
    LoggingSettings,
    MappingSettings,
    ServerSettings,
    Settings,
    StoreSettings,
    UpstreamAuthSettings,
    UpstreamSettings,
)
from shanoir_dicomweb_proxy._errors import ConfigError

# The example of DESIGN.md §8, verbatim.
DESIGN_EXAMPLE = """\
[server]
bind = "127.0.0.1:8080"
base_path = "/dicomweb"          # where the DICOMweb service is served
public_url = ""                  # external base for links; "" = from the request
max_upload_bytes = 4294967296    # STOW bodies above this: 413, nothing stored
[upstream]
url = "http://127.0.0.1:8042/dicom-web"
connect_timeout = 5.0
read_timeout = 300.0
[upstream.auth]                  # optional: how the proxy authenticates to the PACS
type = "basic"                   # basic (username, password) | bearer (token)
username = "proxy"               # | client_credentials (token_url, client_id, client_secret)
password = "…"
[auth]
enabled = true                   # false only when written explicitly (a host app that
                                 # authenticates itself, local trials); loud warning at start
issuer = "https://keycloak.example.org/realms/shanoir-ng"
audience = "dicomweb-proxy"      # string or list
algorithms = ["RS256", "PS256", "ES256"]
leeway = 30                      # seconds of clock skew allowed on exp/nbf/iat
user_claim = "userId"
roles_claim = "realm_access.roles"
admin_roles = ["ROLE_ADMIN"]
# jwks_url = "…"                 # default: from the issuer's discovery document
# jwks_file = "keys.json"        # static keys, no network (and what dev-token signs with)
[auth.introspection]             # optional: opaque tokens (RFC 7662)
url = "https://keycloak.example.org/realms/shanoir-ng/protocol/openid-connect/token/introspect"
client_id = "dicomweb-proxy"
client_secret = "…"
[cors]
allow_origins = ["https://viewer.example.org"]
[mapping]
backend = "sqlite"               # sqlite | static | http | identity
study_root = "1.4.9.12.34.1.8527"
series_root = "1.4.9.12.34.2.8527"
unmapped_series = "expose"
[access]
backend = "sqlite"               # sqlite | static | http | allow_all (every authenticated caller)
cache_ttl = 30                   # seconds a decision may be reused (never past token expiry)
deny_status = 404
retrieve_action = "read"         # or "download"
[store]
path = "dicomweb-proxy.sqlite3"  # the embedded store
[logging]
level = "info"
audit_log = "audit.jsonl"        # one JSON line per access decision; "" = off
"""

# The smallest valid file; tests override single keys of it.
BASE: dict[str, dict[str, Any]] = {
    "upstream": {"url": "http://pacs.example.org:8042/dicom-web"},
    "auth": {"issuer": "https://keycloak.example.org/realms/shanoir-ng"},
    "mapping": {"study_root": "1.4.9.12.34.1.8527", "series_root": "1.4.9.12.34.2.8527"},
}
DROP: Any = object()  # as a value in an override: remove that key or section


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Messages then start with "config.toml: ", as a user who ran the CLI there would see them.
    monkeypatch.chdir(tmp_path)
    yield


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # inf and nan are TOML too
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, datetime.date):
        return value.isoformat()
    raise TypeError(value)


def render(data: Mapping[str, Any], name: str = "") -> str:
    lines = [f"[{name}]"] if name else []
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    lines += [f"{k} = {toml_value(v)}" for k, v in data.items() if k not in tables]
    text = "\n".join(lines) + "\n"
    for key, table in tables.items():
        text += render(table, f"{name}.{key}" if name else key)
    return text


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write(text: str, name: str = "config.toml") -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(**sections: Any) -> Settings:
    return Settings.from_toml(write(render(merge(BASE, sections))))


def fail(**sections: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**sections)
    message = str(info.value)
    assert message.startswith("config.toml: ")
    assert "\n" not in message
    return message


# --- loading -------------------------------------------------------------------------------


def test_design_example_loads(tmp_path: Path) -> None:
    settings = Settings.from_toml(write(DESIGN_EXAMPLE))

    assert settings.source == "config.toml"
    assert settings.server == ServerSettings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    up = settings.upstream
    assert up.url == "http://127.0.0.1:8042/dicom-web"
    assert (up.connect_timeout, up.read_timeout) == (5.0, 300.0)
    assert up.auth == UpstreamAuthSettings(type="basic", username="proxy", password="…")
    auth = settings.auth
    assert auth.enabled is True
    assert auth.issuer == "https://keycloak.example.org/realms/shanoir-ng"
    assert auth.audience == ("dicomweb-proxy",)
    assert auth.algorithms == ("RS256", "PS256", "ES256")
    assert auth.leeway == 30
    assert (auth.user_claim, auth.roles_claim) == ("userId", "realm_access.roles")
    assert auth.admin_roles == ("ROLE_ADMIN",)
    assert auth.introspection == IntrospectionSettings(
        url="https://keycloak.example.org/realms/shanoir-ng/protocol/openid-connect/token/introspect",
        client_id="dicomweb-proxy",
        client_secret="…",
        cache_ttl=60,
    )
    assert settings.cors.allow_origins == ("https://viewer.example.org",)
    assert settings.mapping == MappingSettings(
        study_root="1.4.9.12.34.1.8527", series_root="1.4.9.12.34.2.8527"
    )
    assert settings.access == AccessSettings()
    assert settings.access.cache_ttl == 30.0 and isinstance(settings.access.cache_ttl, float)
    assert settings.store.path == str(tmp_path / "dicomweb-proxy.sqlite3")
    assert settings.logging.level == "info"
    assert settings.logging.audit_log == str(tmp_path / "audit.jsonl")


def test_defaults(tmp_path: Path) -> None:
    settings = load()

    assert settings.server == ServerSettings()
    assert settings.server.bind == "127.0.0.1:8080"
    assert settings.server.base_path == "/dicomweb"
    assert settings.server.public_url == ""
    assert settings.server.max_upload_bytes == 4 * 1024**3
    up = settings.upstream
    assert (up.connect_timeout, up.read_timeout, up.write_timeout, up.pool_timeout) == (
        5.0,
        300.0,
        300.0,
        10.0,
    )
    assert (up.max_connections, up.max_keepalive_connections) == (64, 16)
    assert up.keepalive_expiry == 0.5
    assert up.transport == "aiohttp"
    assert up.auth == UpstreamAuthSettings()
    assert up.auth.type == "none"
    auth = settings.auth
    assert auth.enabled is True
    assert auth.audience == ()
    assert auth.algorithms == ("RS256", "PS256", "ES256")
    assert auth.leeway == 30
    assert auth.introspection is None
    assert (auth.allow_query_token, auth.allow_cookie_token) == (False, False)
    assert auth.cookie_name == "access_token"
    assert settings.cors == CorsSettings()
    assert settings.cors.allow_origins == ()
    assert settings.mapping.backend == "sqlite"
    assert settings.mapping.unmapped_series == "expose"
    assert settings.access == AccessSettings()
    assert (settings.access.deny_status, settings.access.retrieve_action) == (404, "read")
    assert settings.store == StoreSettings(path=str(tmp_path / "dicomweb-proxy.sqlite3"))
    assert settings.logging == LoggingSettings(audit_log=str(tmp_path / "audit.jsonl"))
    assert (settings.logging.level, settings.logging.format) == ("info", "text")


def test_keyword_construction() -> None:
    settings = Settings(
        upstream=UpstreamSettings(url="http://pacs/dicom-web/"),
        auth=AuthSettings(enabled=False),
        mapping=MappingSettings(backend="identity"),
    )
    assert settings.upstream.url == "http://pacs/dicom-web"
    assert settings.source == "<dict>"
    assert settings.store.path == "dicomweb-proxy.sqlite3"  # no file, nothing to resolve against
    with pytest.raises(TypeError):
        ServerSettings("127.0.0.1:80")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: UpstreamSettings(url="ftp://pacs"), "[upstream] url: expected an absolute http"),
        (lambda: ServerSettings(bind="nope"), "[server] bind: expected HOST:PORT"),
        (lambda: AuthSettings(), "[auth] issuer: required"),
        (lambda: MappingSettings(), "[mapping] series_root: must differ from study_root"),
        (lambda: UpstreamAuthSettings(type="bearer"), "[upstream.auth] token: required"),
        (
            lambda: UpstreamSettings(url="http://pacs", read_timeout="1"),  # type: ignore[arg-type]
            "[upstream] read_timeout",
        ),
        (
            lambda: Settings(
                upstream="http://pacs",  # type: ignore[arg-type]
                auth=AuthSettings(enabled=False),
                mapping=MappingSettings(backend="identity"),
            ),
            "upstream: expected UpstreamSettings",
        ),
        (
            lambda: IntrospectionSettings(url="http://kc", client_id="", client_secret="s"),
            "[auth.introspection] client_id: must not be empty",
        ),
    ],
)
def test_keyword_construction_validates(build: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value).startswith(expected)


def test_keyword_construction_coerces() -> None:
    up = UpstreamSettings(url="http://pacs", read_timeout=60)
    assert up.read_timeout == 60.0 and isinstance(up.read_timeout, float)
    auth = AuthSettings(issuer="https://kc", audience="a", admin_roles=["x", "y"])  # type: ignore[arg-type]
    assert (auth.audience, auth.admin_roles) == (("a",), ("x", "y"))


def test_replace_validates() -> None:
    server = ServerSettings()
    assert dataclasses.replace(server, base_path="/x/").base_path == "/x"
    with pytest.raises(ConfigError, match=r"^\[server\] max_upload_bytes: must be > 0$"):
        dataclasses.replace(server, max_upload_bytes=0)


def test_from_dict_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_dict({"upstream": {}})
    assert str(info.value) == "<dict>: [upstream] url: required"
    with pytest.raises(ConfigError) as info:
        Settings.from_dict({"upstream": {}}, source="env")
    assert str(info.value) == "env: [upstream] url: required"


# --- unknown keys and sections -------------------------------------------------------------


def test_unknown_key_did_you_mean() -> None:
    assert fail(upstream={"read_timout": 3}) == (
        "config.toml: [upstream] read_timout: unknown key (did you mean 'read_timeout'?)"
    )
    assert fail(upstream={"auth": {"usrname": "x"}}) == (
        "config.toml: [upstream.auth] usrname: unknown key (did you mean 'username'?)"
    )


def test_unknown_key_in_the_wrong_section() -> None:
    assert fail(upstream={"issuer": "https://kc"}) == (
        "config.toml: [upstream] issuer: unknown key (it belongs in [auth])"
    )


def test_unknown_key_without_suggestion() -> None:
    assert fail(server={"colour": "blue"}) == "config.toml: [server] colour: unknown key"


def test_unknown_section_did_you_mean() -> None:
    assert fail(autth={"x": 1}) == "config.toml: [autth]: unknown section (did you mean '[auth]'?)"
    assert fail(upstream={"authh": {"type": "none"}}) == (
        "config.toml: [upstream.authh]: unknown section (did you mean '[upstream.auth]'?)"
    )
    assert fail(nonsense={"x": 1}) == "config.toml: [nonsense]: unknown section"


def test_key_outside_any_section() -> None:
    assert fail(bind="0.0.0.0:80") == "config.toml: bind: unknown key (it belongs in [server])"


def test_source_is_not_a_file_key() -> None:
    assert fail(source="x").startswith("config.toml: [source]: unknown section")


def test_section_must_be_a_table() -> None:
    text = 'upstream = "http://pacs"\n' + render({"auth": BASE["auth"]})
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(write(text))
    assert str(info.value) == 'config.toml: [upstream]: expected a table, got "http://pacs"'


# --- types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "bind", 8080, "expected a string, got 8080"),
        ("server", "bind", {"host": "x"}, "expected a string, got a table"),
        ("server", "max_upload_bytes", "4G", 'expected an integer, got "4G"'),
        ("server", "max_upload_bytes", True, "expected an integer, got true"),
        ("server", "max_upload_bytes", 4.0, "expected an integer, got 4.0"),
        ("upstream", "read_timeout", "300", 'expected a number, got "300"'),
        ("upstream", "read_timeout", False, "expected a number, got false"),
        ("upstream", "read_timeout", math.inf, "expected a finite number, got inf"),
        ("upstream", "read_timeout", [1], "expected a number, got [1]"),
        ("auth", "enabled", 1, "expected true or false, got 1"),
        ("auth", "enabled", "false", 'expected true or false, got "false"'),
        ("auth", "audience", ["a", 1], 'expected a string or an array of strings, got ["a", 1]'),
        ("auth", "admin_roles", 5, "expected a string or an array of strings, got 5"),
        ("auth", "leeway", datetime.date(2024, 1, 1), "expected an integer, got a date/time"),
        ("upstream", "transport", "requests", 'expected one of "httpx", "aiohttp", got "requests"'),
        ("access", "deny_status", 500, "expected one of 403, 404, got 500"),
        ("access", "deny_status", "404", 'expected one of 403, 404, got "404"'),
        ("logging", "level", "INFO", 'expected one of "debug", "info", "warning", "error"'),
        ("mapping", "study_root", 1.2, "expected a string, got 1.2"),
    ],
)
def test_wrong_type(section: str, key: str, value: Any, expected: str) -> None:
    message = fail(**{section: {key: value}})
    assert message.startswith(f"config.toml: [{section}] {key}: {expected}")


def test_long_values_are_shortened() -> None:
    message = fail(server={"bind": 1, "base_path": "x" * 500})
    assert message == "config.toml: [server] bind: expected a string, got 1"
    message = fail(access={"deny_status": "4" * 500})
    assert len(message) < 200 and message.endswith("…")


def test_int_accepted_for_float_and_string_for_tuple() -> None:
    settings = load(upstream={"read_timeout": 60}, auth={"audience": "one"})
    assert settings.upstream.read_timeout == 60.0
    assert isinstance(settings.upstream.read_timeout, float)
    assert settings.auth.audience == ("one",)
    settings = load(auth={"audience": ["one", "two"]})
    assert settings.auth.audience == ("one", "two")


# --- required values -----------------------------------------------------------------------


def test_missing_upstream_url() -> None:
    assert fail(upstream={"url": DROP}) == "config.toml: [upstream] url: required"


def test_missing_upstream_section() -> None:
    assert fail(upstream=DROP) == "config.toml: [upstream] url: required"


def test_introspection_needs_url_and_client() -> None:
    message = fail(auth={"introspection": {"url": "https://kc/introspect", "client_id": "p"}})
    assert message == (
        "config.toml: [auth.introspection] client_secret: required (or client_secret_file)"
    )


# --- values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://pacs/dicom-web",
        "pacs:8042/dicom-web",
        "//pacs/dicom-web",
        "http://",
        "http://pacs:99999/",
        "http://pacs name/",
        "",
    ],
)
def test_bad_upstream_url(url: str) -> None:
    assert fail(upstream={"url": url}) == (
        "config.toml: [upstream] url: expected an absolute http or https URL, "
        f"got {json.dumps(url)}"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://pacs/dicom-web?x=1", "must not have a query"),
        ("http://pacs/dicom-web#x", "must not have a fragment"),
    ],
)
def test_upstream_url_without_query_or_fragment(url: str, expected: str) -> None:
    assert fail(upstream={"url": url}).startswith(f"config.toml: [upstream] url: {expected}")


def test_upstream_url_without_credentials() -> None:
    message = fail(upstream={"url": "http://proxy:s3cr3t@pacs/dicom-web"})
    assert message.startswith("config.toml: [upstream] url: must not hold credentials")
    assert "[upstream.auth]" in message
    assert "s3cr3t" not in message


def test_urls_lose_their_trailing_slash() -> None:
    settings = load(
        upstream={"url": "https://pacs/dicom-web/"},
        server={"public_url": "https://proxy.example.org/pacs/"},
    )
    assert settings.upstream.url == "https://pacs/dicom-web"
    assert settings.server.public_url == "https://proxy.example.org/pacs"


def test_issuer_is_kept_verbatim() -> None:
    issuer = "https://keycloak.example.org/realms/x/"
    assert load(auth={"issuer": issuer}).auth.issuer == issuer


@pytest.mark.parametrize("url", ["proxy.example.org", "https://proxy.example.org/?a=1"])
def test_bad_public_url(url: str) -> None:
    assert fail(server={"public_url": url}).startswith("config.toml: [server] public_url: ")


@pytest.mark.parametrize(
    ("bind", "host", "port"),
    [
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("[::1]:8080", "::1", 8080),
        ("[::]:0", "::", 0),
        ("proxy.example.org:443", "proxy.example.org", 443),
        ("localhost:65535", "localhost", 65535),
    ],
)
def test_bind(bind: str, host: str, port: int) -> None:
    server = load(server={"bind": bind}).server
    assert (server.bind, server.host, server.port) == (bind, host, port)


@pytest.mark.parametrize(
    "bind",
    ["localhost", ":8080", "::1:8080", "[::1]", "[nope]:80", "host:65536", "host:http", "a_b:80"],
)
def test_bad_bind(bind: str) -> None:
    assert fail(server={"bind": bind}) == (
        "config.toml: [server] bind: expected HOST:PORT (IPv6 as [::1]:8080), "
        f"got {json.dumps(bind)}"
    )


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("/dicomweb", "/dicomweb"),
        ("/x/", "/x"),
        ("/", ""),
        ("", ""),
        ("/a/b-c/d_e.f~g", "/a/b-c/d_e.f~g"),
    ],
)
def test_base_path_normalisation(given: str, normalised: str) -> None:
    assert load(server={"base_path": given}).server.base_path == normalised


@pytest.mark.parametrize(
    "base_path", ["dicomweb", "/a//b", "/a/../b", "/./a", "/a b", "/a%20b", "/a?b", "/é"]
)
def test_bad_base_path(base_path: str) -> None:
    message = fail(server={"base_path": base_path})
    assert message.startswith('config.toml: [server] base_path: expected a path such as "/')
    assert message.endswith(f"got {json.dumps(base_path, ensure_ascii=False)}")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "max_upload_bytes", 0, "must be > 0"),
        ("upstream", "connect_timeout", 0, "must be > 0"),
        ("upstream", "pool_timeout", -1.5, "must be > 0"),
        ("upstream", "max_connections", 0, "must be > 0"),
        ("upstream", "max_keepalive_connections", 65, "must be between 0 and max_connections"),
        ("upstream", "keepalive_expiry", -0.1, "must be >= 0"),
        ("auth", "leeway", -1, "must be >= 0"),
        ("auth", "user_claim", "", "must not be empty"),
        ("auth", "roles_claim", "realm_access..roles", "expected a claim name or dotted path"),
        ("auth", "cookie_name", "a b", "expected a cookie name"),
        ("auth", "audience", [""], "expected non-empty audience names"),
        ("auth", "jwks_url", "keys.json", "expected an absolute http or https URL"),
        ("cors", "max_age", -1, "must be >= 0"),
        ("cors", "allow_methods", ["GET", "PO ST"], 'expected header or method names, got "PO ST"'),
        ("access", "cache_ttl", -1, "must be >= 0"),
        ("store", "path", "", "must not be empty"),
        ("server", "forwarded_allow_ips", ["10.0.0.0/8", "gw"], "expected IP addresses"),
        ("server", "forwarded_allow_ips", ["*", "10.0.0.1"], '"*" must be the only entry'),
    ],
)
def test_bad_value(section: str, key: str, value: Any, expected: str) -> None:
    assert fail(**{section: {key: value}}).startswith(f"config.toml: [{section}] {key}: {expected}")


def test_forwarded_allow_ips() -> None:
    assert load().server.forwarded_allow_ips == ("127.0.0.1", "::1")
    server = load(server={"forwarded_allow_ips": ["10.0.0.0/8", "fd00::/8"]}).server
    assert server.forwarded_allow_ips == ("10.0.0.0/8", "fd00::/8")
    assert load(server={"forwarded_allow_ips": "*"}).server.forwarded_allow_ips == ("*",)


# --- mapping roots -------------------------------------------------------------------------


def test_equal_roots_rejected() -> None:
    message = fail(mapping={"study_root": "1.2.3", "series_root": "1.2.3"})
    assert message.startswith("config.toml: [mapping] series_root: must differ from study_root")
    assert "collide" in message


def test_empty_roots_rejected() -> None:
    message = fail(mapping=DROP)
    assert message.startswith("config.toml: [mapping] series_root: must differ from study_root")


def test_equal_roots_allowed_for_identity() -> None:
    mapping = load(mapping={"backend": "identity", "study_root": DROP, "series_root": DROP}).mapping
    assert (mapping.backend, mapping.study_root, mapping.series_root) == ("identity", "", "")


def test_one_empty_root_is_fine() -> None:
    mapping = load(mapping={"study_root": ""}).mapping
    assert (mapping.study_root, mapping.series_root) == ("", "1.4.9.12.34.2.8527")


def test_root_length_limit() -> None:
    longest = "1." + "2" * 41
    assert len(longest) == 43
    assert load(mapping={"study_root": longest}).mapping.study_root == longest
    message = fail(mapping={"study_root": longest + "3"})
    assert message.startswith("config.toml: [mapping] study_root: too long (44 characters)")
    assert "43" in message and "64" in message


@pytest.mark.parametrize("root", ["1.02", "1..2", ".1", "1.", "01", "a.b", "1.2 "])
def test_bad_root_syntax(root: str) -> None:
    message = fail(mapping={"series_root": root})
    assert message.startswith("config.toml: [mapping] series_root: expected a UID root")


def test_zero_components_are_valid_roots() -> None:
    assert load(mapping={"study_root": "0.0.1"}).mapping.study_root == "0.0.1"


# --- backends ------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["mapping", "access"])
def test_static_backend_needs_a_file(section: str) -> None:
    assert fail(**{section: {"backend": "static"}}) == (
        f'config.toml: [{section}] file: required when backend = "static"'
    )


@pytest.mark.parametrize("section", ["mapping", "access"])
def test_http_backend_needs_a_url(section: str) -> None:
    assert fail(**{section: {"backend": "http"}}) == (
        f'config.toml: [{section}] url: required when backend = "http"'
    )
    settings = load(**{section: {"backend": "http", "url": "https://shanoir/api/dicomweb/"}})
    assert getattr(settings, section).url == "https://shanoir/api/dicomweb"


@pytest.mark.parametrize("section", ["mapping", "access"])
def test_backend_source_unused(section: str) -> None:
    assert fail(**{section: {"file": "grants.toml"}}) == (
        f'config.toml: [{section}] file: only used with backend = "static" (backend is "sqlite")'
    )


def test_allow_all_access() -> None:
    assert load(access={"backend": "allow_all"}).access.backend == "allow_all"


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "HS512", "none"])
def test_symmetric_or_no_algorithm_rejected(algorithm: str) -> None:
    message = fail(auth={"algorithms": ["RS256", algorithm]})
    assert message.startswith(
        f'config.toml: [auth] algorithms: "{algorithm}" is not allowed: shared-secret'
    )
    assert "RS256" in message and "EdDSA" in message


def test_unknown_algorithm_rejected() -> None:
    message = fail(auth={"algorithms": "rs256"})
    assert message.startswith('config.toml: [auth] algorithms: "rs256" is not allowed; use RS256')


def test_algorithms_must_not_be_empty() -> None:
    assert fail(auth={"algorithms": []}).startswith(
        "config.toml: [auth] algorithms: expected at least one of RS256"
    )


def test_all_asymmetric_algorithms_accepted() -> None:
    names = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
    assert load(auth={"algorithms": [*names, "EdDSA"]}).auth.algorithms == (*names, "EdDSA")


def test_auth_enabled_without_key_source() -> None:
    message = fail(auth={"issuer": DROP})
    assert message.startswith("config.toml: [auth] issuer: required: set issuer, jwks_url")
    assert "[auth.introspection]" in message and "enabled = false" in message
    assert fail(auth=DROP) == message


def test_auth_disabled_explicitly() -> None:
    assert load(auth={"issuer": DROP, "enabled": False}).auth.enabled is False


@pytest.mark.parametrize(
    "source",
    [
        {"jwks_url": "https://kc/certs"},
        {"jwks_file": "keys.json"},
        {"introspection": {"url": "https://kc/introspect", "client_id": "p", "client_secret": "s"}},
    ],
)
def test_auth_key_sources(source: dict[str, Any]) -> None:
    assert load(auth={"issuer": DROP, **source}).auth.enabled is True


# --- upstream authentication ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"type": "basic", "username": "u"}, 'password: required when type = "basic"'),
        ({"type": "basic"}, 'username, password: required when type = "basic"'),
        ({"type": "bearer"}, 'token: required when type = "bearer"'),
        (
            {"type": "client_credentials", "client_id": "c"},
            'token_url, client_secret: required when type = "client_credentials"',
        ),
        ({"username": "u"}, 'username: only used with type = "basic" (type is "none")'),
        (
            {"type": "bearer", "token": "t", "scope": "x"},
            'scope: only used with type = "client_credentials" (type is "bearer")',
        ),
        ({"type": "digest"}, "type: expected one of"),
    ],
)
def test_upstream_auth_errors(auth: dict[str, Any], expected: str) -> None:
    assert fail(upstream={"auth": auth}).startswith(f"config.toml: [upstream.auth] {expected}")


def test_upstream_auth_types() -> None:
    basic = load(upstream={"auth": {"type": "basic", "username": "u", "password": "p"}})
    assert basic.upstream.auth.password == "p"
    bearer = load(upstream={"auth": {"type": "bearer", "token": "t"}})
    assert bearer.upstream.auth.token == "t"
    cc = {
        "type": "client_credentials",
        "token_url": "https://kc/token",
        "client_id": "proxy",
        "client_secret": "s",
        "scope": "pacs",
    }
    assert load(upstream={"auth": cc}).upstream.auth.scope == "pacs"
    message = fail(upstream={"auth": {**cc, "token_url": "kc/token"}})
    assert message.startswith("config.toml: [upstream.auth] token_url: expected an absolute")


# --- CORS ----------------------------------------------------------------------------------


def test_cors_origins_normalised() -> None:
    origins = [
        "HTTPS://Viewer.Example.org:443/",
        "http://localhost:3000",
        "http://[::1]:80",
        "https://[::1]:8443",
    ]
    assert load(cors={"allow_origins": origins}).cors.allow_origins == (
        "https://viewer.example.org",
        "http://localhost:3000",
        "http://[::1]",
        "https://[::1]:8443",
    )


@pytest.mark.parametrize(
    "origin", ["https://viewer.example.org/app", "viewer.example.org", "https://a?b", "file://x"]
)
def test_cors_origin_without_path(origin: str) -> None:
    assert fail(cors={"allow_origins": [origin]}).startswith(
        'config.toml: [cors] allow_origins: expected "*" or an origin such as'
    )


def test_cors_star() -> None:
    assert load(cors={"allow_origins": "*"}).cors.allow_origins == ("*",)
    assert fail(cors={"allow_origins": "*", "allow_credentials": True}).startswith(
        'config.toml: [cors] allow_origins: "*" cannot be combined with allow_credentials'
    )
    assert fail(cors={"allow_origins": ["*", "https://a"]}) == (
        'config.toml: [cors] allow_origins: "*" must be the only origin'
    )


# --- paths ---------------------------------------------------------------------------------


def test_relative_paths_resolved_against_the_config_directory(tmp_path: Path) -> None:
    sections = merge(
        BASE,
        {
            "auth": {"jwks_file": "keys.json"},
            "mapping": {"backend": "static", "file": "data/mapping.toml"},
            "access": {"backend": "static", "file": "/etc/proxy/grants.toml"},
            "store": {"path": "../store.sqlite3"},
            "logging": {"audit_log": ""},
        },
    )
    settings = Settings.from_toml(write(render(sections), "conf/proxy.toml"))
    conf = tmp_path / "conf"
    assert settings.source == "conf/proxy.toml"
    assert settings.auth.jwks_file == str(conf / "keys.json")
    assert settings.mapping.file == str(conf / "data/mapping.toml")
    assert settings.access.file == "/etc/proxy/grants.toml"
    assert settings.store.path == str(conf / "../store.sqlite3")
    assert settings.logging.audit_log == ""


def test_default_paths_resolved_against_the_config_directory(tmp_path: Path) -> None:
    settings = Settings.from_toml(write(render(BASE), "conf/proxy.toml"))
    assert settings.store.path == str(tmp_path / "conf" / "dicomweb-proxy.sqlite3")
    assert settings.logging.audit_log == str(tmp_path / "conf" / "audit.jsonl")


def test_from_dict_paths(tmp_path: Path) -> None:
    data = merge(BASE, {"auth": {"jwks_file": "keys.json"}})
    assert Settings.from_dict(data, base_dir=tmp_path).auth.jwks_file == str(tmp_path / "keys.json")
    unresolved = Settings.from_dict(data)
    assert unresolved.auth.jwks_file == "keys.json"
    assert unresolved.store.path == "dicomweb-proxy.sqlite3"


# --- files ---------------------------------------------------------------------------------


def test_toml_syntax_error() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(write('[upstream]\nurl = "http://pacs\n'))
    message = str(info.value)
    assert message.startswith("config.toml: invalid TOML: ")
    assert "line 2" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_toml("missing.toml")
    assert str(info.value) == "missing.toml: cannot read: No such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_not_utf8() -> None:
    path = Path("config.toml")
    path.write_bytes(b'[upstream]\nurl = "http://p\xe9"\n')
    with pytest.raises(ConfigError, match=r"^config\.toml: not UTF-8 text: "):
        Settings.from_toml(path)


# --- objects -------------------------------------------------------------------------------


def test_frozen_and_slotted() -> None:
    settings = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server = ServerSettings()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.upstream.url = "http://elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.auth.algorithms = ("HS256",)  # type: ignore[misc]
    assert not hasattr(settings, "__dict__")


def test_equality_hash_and_pickle(tmp_path: Path) -> None:
    from_file = load()
    from_dict = Settings.from_dict(merge(BASE, {}), base_dir=tmp_path)
    assert from_file == from_dict  # source is not compared
    assert hash(from_file) == hash(from_dict)
    assert pickle.loads(pickle.dumps(from_file)) == from_file


SECRETS = ["basic-pw-1", "bearer-tok-2", "cc-secret-3", "introspect-secret-4"]


@pytest.mark.parametrize(
    "upstream_auth",
    [
        {"type": "basic", "username": "proxy", "password": SECRETS[0]},
        {"type": "bearer", "token": SECRETS[1]},
        {
            "type": "client_credentials",
            "token_url": "https://kc/token",
            "client_id": "proxy",
            "client_secret": SECRETS[2],
        },
    ],
    ids=["basic", "bearer", "client_credentials"],
)
def test_secrets_absent_from_repr_and_to_dict(upstream_auth: dict[str, str]) -> None:
    intro = {"url": "https://kc/introspect", "client_id": "p", "client_secret": SECRETS[3]}
    settings = load(upstream={"auth": upstream_auth}, auth={"introspection": intro})
    shown = [repr(settings), str(settings), repr(settings.upstream.auth), str(settings.to_dict())]
    for text in shown:
        assert "***" in text
        for secret in SECRETS:
            assert secret not in text
    assert settings.to_dict()["auth"]["introspection"]["client_secret"] == "***"


def test_secret_values_absent_from_errors() -> None:
    message = fail(upstream={"auth": {"type": "bearer", "token": 123456789}})
    assert message == "config.toml: [upstream.auth] token: expected a string, got an integer"


def test_to_dict_is_plain_data_that_loads_back(tmp_path: Path) -> None:
    settings = Settings.from_toml(write(DESIGN_EXAMPLE))
    data = settings.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["server"]["max_upload_bytes"] == 4294967296
    assert data["auth"]["audience"] == ["dicomweb-proxy"]
    assert data["upstream"]["auth"]["password"] == "***"
    assert data["upstream"]["auth"]["token"] == ""  # empty secrets stay visibly empty
    assert "source" not in data
    no_secrets = Settings.from_dict(
        merge(data, {"upstream": {"auth": DROP}, "auth": {"introspection": DROP}})
    )
    assert "introspection" not in no_secrets.to_dict()["auth"]
    assert Settings.from_dict(no_secrets.to_dict()) == no_secrets


def test_repr_shows_what_differs_from_defaults() -> None:
    assert repr(ServerSettings()) == "ServerSettings()"
    assert repr(ServerSettings(bind="0.0.0.0:80", base_path="/x/")) == (
        "ServerSettings(bind='0.0.0.0:80', base_path='/x')"
    )
    assert repr(UpstreamAuthSettings(type="bearer", token="t")) == (
        "UpstreamAuthSettings(type='bearer', token='***')"
    )
    text = repr(load())
    assert text.startswith("Settings(server=ServerSettings(), upstream=UpstreamSettings(url=")
    assert "source" not in text


# --- secrets from files and the environment ------------------------------------------------

SECRET = "s3cr3t-never-shown"


def _shown(settings: Settings) -> str:
    """Everything the settings say of themselves: repr, to_dict, and each section's repr."""
    sections = [repr(getattr(settings, name)) for name in ("upstream", "auth", "mapping")]
    return " ".join([repr(settings), str(settings.to_dict()), *sections])


@pytest.mark.parametrize(
    ("section", "key", "read"),
    [
        (
            {"upstream": {"auth": {"type": "basic", "username": "proxy"}}},
            ("upstream", "auth", "password"),
            lambda s: s.upstream.auth.password,
        ),
        (
            {"upstream": {"auth": {"type": "bearer"}}},
            ("upstream", "auth", "token"),
            lambda s: s.upstream.auth.token,
        ),
        (
            {
                "upstream": {
                    "auth": {
                        "type": "client_credentials",
                        "token_url": "https://kc/token",
                        "client_id": "proxy",
                    }
                }
            },
            ("upstream", "auth", "client_secret"),
            lambda s: s.upstream.auth.client_secret,
        ),
        (
            {"auth": {"introspection": {"url": "https://kc/introspect", "client_id": "proxy"}}},
            ("auth", "introspection", "client_secret"),
            lambda s: s.auth.introspection.client_secret,
        ),
        (
            {"mapping": {"backend": "http", "url": "https://platform/api"}},
            ("mapping", "token"),
            lambda s: s.mapping.token,
        ),
        (
            {"access": {"backend": "http", "url": "https://platform/api"}},
            ("access", "token"),
            lambda s: s.access.token,
        ),
    ],
)
def test_every_secret_from_a_file_or_the_environment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    section: dict[str, Any],
    key: tuple[str, ...],
    read: Callable[[Settings], str],
) -> None:
    def at(value: str, suffix: str = "") -> dict[str, Any]:
        data: dict[str, Any] = {key[-1] + suffix: value}
        for name in reversed(key[:-1]):
            data = {name: data}
        return merge(section, data)

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "value").write_text(SECRET + "\n")
    from_file = load(**at("secrets/value", "_file"))  # relative to the settings file
    assert read(from_file) == SECRET
    assert SECRET not in _shown(from_file)
    monkeypatch.setenv("PROXY_SECRET", SECRET)
    from_env = load(**at("${PROXY_SECRET}"))
    assert read(from_env) == SECRET
    assert SECRET not in _shown(from_env)
    where = "[" + ".".join(key[:-1]) + "]"
    assert fail(**at(str(tmp_path / "missing"), "_file")) == (
        f"config.toml: {where} {key[-1]}_file: cannot read {tmp_path / 'missing'}: "
        "No such file or directory"
    )
    monkeypatch.delenv("PROXY_SECRET")
    assert fail(**at("${PROXY_SECRET}")) == (
        f"config.toml: {where} {key[-1]}: the environment variable PROXY_SECRET is not set"
    )
    both = merge(at("inline"), at("secrets/value", "_file"))
    assert fail(**both) == (
        f"config.toml: {where} {key[-1]}_file: give {key[-1]} or {key[-1]}_file, not both"
    )


def test_secret_files_are_checked_like_inline_secrets(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("two words\n")
    message = fail(mapping={"backend": "http", "url": "https://p/api", "token_file": "token"})
    assert message == (
        "config.toml: [mapping] token: expected a token of printable ASCII characters "
        "without spaces"
    )
    (tmp_path / "empty").write_text("\n")
    assert fail(access={"backend": "http", "url": "https://p/api", "token_file": "empty"}) == (
        f"config.toml: [access] token_file: {tmp_path / 'empty'} is empty"
    )
    (tmp_path / "pw").write_text("x")
    assert fail(upstream={"auth": {"type": "bearer", "token": "t", "password_file": "pw"}}) == (
        'config.toml: [upstream.auth] password_file: only used with type = "basic" '
        '(type is "bearer")'
    )


# --- files the proxy writes ------------------------------------------------------------------


def test_written_files_go_to_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/shanoir-dicomweb-proxy")
    settings = Settings.from_toml(write(render(merge(BASE, {"auth": {"jwks_file": "k.json"}}))))
    assert settings.store.path == "/var/lib/shanoir-dicomweb-proxy/dicomweb-proxy.sqlite3"
    assert settings.logging.audit_log == "/var/lib/shanoir-dicomweb-proxy/audit.jsonl"
    assert settings.auth.jwks_file == str(tmp_path / "k.json")  # read: by the settings file
    custom = load(store={"path": "/srv/store.sqlite3"}, logging={"audit_log": "logs/a.jsonl"})
    assert custom.store.path == "/srv/store.sqlite3"
    assert custom.logging.audit_log == "/var/lib/shanoir-dicomweb-proxy/logs/a.jsonl"


def test_audit_log_group() -> None:
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    assert load(logging={"audit_log_group": group}).logging.audit_log_group == group
    assert fail(logging={"audit_log_group": "no-such-group-here"}) == (
        'config.toml: [logging] audit_log_group: no such group: "no-such-group-here"'
    )
