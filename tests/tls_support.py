"""TLS for the tests: a trustme CA, the fake AIS target behind TLS, gunicorn served over HTTPS.

trustme makes a throw-away CA and certificates for ``127.0.0.1`` in memory (files only where a
path is needed), so the tests run real handshakes, verification and mTLS without a network.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.conftest import GunicornServer
from tests.fake_target import FakeTarget


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: trustme.CA
    ca_pem: Path
    server_pem: Path  # certificate chain + key (one file)
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("etl-client@example.invalid")
        files = {
            "ca_pem": ca.cert_pem,
            "server_pem": None,
            "server_crt": None,
            "server_key": server.private_key_pem,
            "client_crt": None,
            "client_key": client.private_key_pem,
        }
        paths = {name: directory / f"{name}.pem" for name in files}
        for name, blob in files.items():
            if blob is not None:
                blob.write_to_path(str(paths[name]))
        server.private_key_and_cert_chain_pem.write_to_path(str(paths["server_pem"]))
        for blob in server.cert_chain_pems:
            blob.write_to_path(str(paths["server_crt"]), append=True)
        for blob in client.cert_chain_pems:
            blob.write_to_path(str(paths["client_crt"]), append=True)
        return cls(ca, **paths)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (what a caller of an HTTPS ETL uses)."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


class TLSFakeTarget(FakeTarget):
    """:class:`FakeTarget` whose listening socket is wrapped in TLS; optionally requires a
    client certificate signed by the same CA (mTLS).  ``url`` is ``https://127.0.0.1:<port>``."""

    def __init__(self, pki: Pki, require_client_cert: bool = False) -> None:
        super().__init__()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.server_pem))
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(pki.ca_pem))
        # The handshake runs on the handler's thread (first read), not in the accept loop; a
        # failed handshake is what some tests want, so it is not printed as a server error.
        self.server.socket = ctx.wrap_socket(
            self.server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.url = f"https://127.0.0.1:{self.port}"


class TLSGunicornServer(GunicornServer):
    """gunicorn serving HTTPS (``ETL_CERTFILE``/``ETL_KEYFILE``); health checked over TLS."""

    def __init__(self, app: str, pki: Pki, env: dict[str, str] | None = None) -> None:
        tls = {"ETL_CERTFILE": str(pki.server_crt), "ETL_KEYFILE": str(pki.server_key)}
        super().__init__(app, {**tls, **(env or {})})
        self.context = pki.client_context()
        self.url = f"https://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.url + "/health", timeout=1, context=self.context
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False
