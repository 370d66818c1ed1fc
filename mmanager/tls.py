"""TLS between hubs, controllers and their callers, from one set of settings on both sides.

The hub and a controller are each other's server and client (the hub calls a
controller's API; a controller pushes heartbeats to the hub), so the same four
settings cover both roles:

- ``MMANAGER_TLS_CERT`` / ``MMANAGER_TLS_KEY``: serve HTTPS with this
  certificate, and present it as the client certificate when calling the peer;
- ``MMANAGER_TLS_CA``: the CA bundle a peer's certificate is verified against
  (without it, the system trust store); only this bundle is trusted then;
- ``MMANAGER_TLS_CLIENT_AUTH``: callers must present a certificate signed by
  that CA (mutual TLS); the handshake fails for one that does not.

Peers are always verified, host name included: there is no switch to turn
verification off. ``TlsConfig.problem()`` loads every file once at start-up,
so a missing file, a key that does not match its certificate or an encrypted
key stops the process with a clear message instead of failing on first use.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise _EncryptedKey()


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_auth: bool = False

    @property
    def serves_https(self) -> bool:
        return self.cert is not None

    def problem(self) -> str | None:
        """Why these settings cannot work, or None when every file loads."""
        if (self.cert is None) != (self.key is None):
            return "MMANAGER_TLS_CERT and MMANAGER_TLS_KEY go together: set both to serve HTTPS, or neither"
        if self.client_auth and self.cert is None:
            return (
                "MMANAGER_TLS_CLIENT_AUTH needs MMANAGER_TLS_CERT and MMANAGER_TLS_KEY: "
                "client certificates can only be required over HTTPS"
            )
        if self.client_auth and self.ca is None:
            return "MMANAGER_TLS_CLIENT_AUTH needs MMANAGER_TLS_CA, the CA that signs the callers' certificates"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca is not None:
            try:
                context.load_verify_locations(cafile=self.ca)
            except (OSError, ssl.SSLError) as exc:
                return f"MMANAGER_TLS_CA={self.ca}: not a readable PEM CA bundle ({_reason(exc)})"
        if self.cert is not None:
            try:
                context.load_cert_chain(self.cert, self.key, password=_no_password)
            except _EncryptedKey:
                return f"MMANAGER_TLS_KEY={self.key} is encrypted; give an unencrypted key (readable by this user only)"
            except (OSError, ssl.SSLError) as exc:
                return (
                    f"MMANAGER_TLS_CERT={self.cert} with MMANAGER_TLS_KEY={self.key}: "
                    f"cannot load the certificate and its key ({_reason(exc)})"
                )
        return None

    def server_options(self) -> dict[str, Any]:
        """``uvicorn.run``/``uvicorn.Config`` keyword arguments: none for plain HTTP."""
        if self.cert is None:
            return {}
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_auth:
            options.update(ssl_ca_certs=str(self.ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options

    def client_context(self) -> ssl.SSLContext:
        """What an HTTP client calling a peer passes as httpx's ``verify``: the peer verified
        against the CA (or the system store), our own certificate presented when we have one."""
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca is not None else None)
        if self.cert is not None:
            context.load_cert_chain(self.cert, self.key, password=_no_password)
        return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc)
