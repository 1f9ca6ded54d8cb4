"""The ``shanoir-dicomweb-proxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._app import DicomWebProxy, create_app
from ._auth import dev_token
from ._config import Settings
from ._errors import ConfigError, ProxyError
from ._upstream import Upstream

__all__ = ["main"]

_CONFIG_ENV = "SHANOIR_DICOMWEB_PROXY_CONFIG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shanoir-dicomweb-proxy",
        description="An authorizing, identifier-translating, streaming DICOMweb gateway.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy under hypercorn")
    serve.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
    serve.add_argument("--bind", metavar="HOST:PORT", help="override [server] bind")
    serve.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes")

    check = commands.add_parser("check", help="validate the settings and probe the upstream")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")

    token = commands.add_parser(
        "dev-token", help="sign a token with the private key of [auth] jwks_file (demos, tests)"
    )
    token.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
    token.add_argument("--sub", required=True, metavar="USER", help="the token's subject")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="an extra claim; V is read as JSON when it parses, dotted K nests (repeatable)",
    )
    token.add_argument("--ttl", type=int, default=3600, metavar="S", help="lifetime in seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_toml(args.config)
        if args.command == "serve":
            return _serve(settings, args.config, bind=args.bind, workers=args.workers)
        if args.command == "dev-token":
            print(dev_token(settings, args.sub, _claims(args.claim), ttl=args.ttl))
            return 0
        return _check(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _claims(items: list[str]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--claim {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        target = claims
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return claims


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every upstream request at INFO, URL included: upstream UIDs have no place in
    # the proxy's log, and the line costs throughput.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.root.level))


def _hypercorn_config(settings: Settings, bind: str | None, workers: int) -> object:
    from hypercorn.config import Config

    config = Config()
    config.bind = [bind or settings.server.bind]
    config.workers = workers
    config.errorlog = "-"
    config.loglevel = settings.logging.level.upper()
    # Study retrieves can take minutes on a slow link; the upstream read timeout bounds them.
    config.keep_alive_timeout = 75
    return config


def _serve(settings: Settings, path: str, *, bind: str | None, workers: int) -> int:
    if workers < 1:
        raise ConfigError("--workers: expected a positive integer")
    _setup_logging(settings)
    app = create_app(settings)  # validates before anything listens
    config = _hypercorn_config(settings, bind, workers)
    if workers == 1:
        from hypercorn.asyncio import serve

        asyncio.run(serve(app, config))  # type: ignore[arg-type]
        return 0
    from hypercorn.run import run

    os.environ[_CONFIG_ENV] = os.path.abspath(path)
    config.application_path = f"{__name__}:_worker_app()"  # type: ignore[attr-defined]
    return int(run(config))  # type: ignore[arg-type]


def _worker_app() -> DicomWebProxy:
    """The app of one hypercorn worker process (``serve --workers N``)."""
    settings = Settings.from_toml(os.environ[_CONFIG_ENV])
    _setup_logging(settings)
    return create_app(settings)


def _check(settings: Settings) -> int:
    print(f"settings: {settings.source}: valid")
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"settings: {exc}")
        return 1
    return asyncio.run(_probe(app))


async def _probe(app: DicomWebProxy) -> int:
    """Ask the upstream and the issuer what requests will ask them; report each."""
    ok = True
    status = await _probe_upstream(app.settings)
    print(f"upstream: {app.settings.upstream.url}: {status}")
    ok = status.startswith("QIDO answered 20")
    if app.validator is not None:
        keys = app.validator.keys
        try:
            await keys.keys(None)
            print(f"issuer: {keys.issuer or keys.jwks_url or keys.jwks_file}: {keys.known} keys")
        except ProxyError as exc:
            print(f"issuer: {keys.issuer or keys.jwks_url}: {exc.detail}")
            ok = False
        finally:
            await app.validator.aclose()
    print("ok" if ok else "problems found")
    return 0 if ok else 1


async def _probe_upstream(settings: Settings) -> str:
    """One QIDO with limit=1, through the same client (and credentials) the proxy uses."""
    upstream = Upstream(settings.upstream)
    try:
        headers = [(b"accept", b"application/dicom+json")]
        response = await upstream.send("GET", "/studies?limit=1", headers=headers)
        await response.aclose()
    except ProxyError as exc:
        return f"unreachable ({exc.detail})"
    finally:
        await upstream.aclose()
    return f"QIDO answered {response.status_code}"
