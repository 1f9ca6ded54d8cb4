"""The ``shanoir-dicomweb-proxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import httpx

from ._app import DicomWebProxy, create_app
from ._config import Settings
from ._errors import ConfigError

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_toml(args.config)
        if args.command == "serve":
            return _serve(settings, args.config, bind=args.bind, workers=args.workers)
        return _check(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
    ok = True
    print(f"settings: {settings.source}: valid")
    try:
        create_app(settings)
    except ConfigError as exc:
        print(f"settings: {exc}")
        ok = False
    url = settings.upstream.url + "/studies?limit=1"
    auth: httpx.Auth | None = None
    if settings.upstream.auth.type == "basic":
        auth = httpx.BasicAuth(settings.upstream.auth.username, settings.upstream.auth.password)
    try:
        response = httpx.get(
            url,
            auth=auth,
            headers={"accept": "application/dicom+json"}
            | (
                {"authorization": f"Bearer {settings.upstream.auth.token}"}
                if settings.upstream.auth.type == "bearer"
                else {}
            ),
            timeout=settings.upstream.connect_timeout + 10,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        print(f"upstream: {settings.upstream.url}: unreachable ({exc.__class__.__name__}: {exc})")
        ok = False
    else:
        if response.status_code in (200, 204):
            print(f"upstream: {settings.upstream.url}: QIDO answered {response.status_code}")
        else:
            print(f"upstream: {settings.upstream.url}: QIDO answered {response.status_code}")
            ok = False
    print("ok" if ok else "problems found")
    return 0 if ok else 1
