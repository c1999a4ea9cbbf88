"""Transport security: the server's TLS credentials, checked at start and renewed on reload.

Where it sits: the server (``riskd.service.server``) builds a ``ServerTls`` from the
``tls_cert``, ``tls_key`` and ``tls_client_ca`` files before it binds (or, without them,
checks that plaintext is allowed: ``check_insecure_listen``), and a reload reads the files
again (``ServerTls.read``). The client certificate it asks for names the caller to the
interceptor (``riskd.service.auth``).
"""

from __future__ import annotations

import datetime
import re
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from riskd.config import is_loopback
from riskd.domain.clock import Clock, SystemClock
from riskd.errors import ConfigError


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca_file``, mutual TLS (client certificates required).

    Raises:
        ConfigError: a file cannot be read, or is not what its key needs: a PEM
            certificate, the private key of that certificate (not encrypted), PEM
            CA certificates (names the key and the file, not its content).
    """
    key, cert, ca = _tls_material(cert_file, key_file, client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class ServerTls:
    """TLS server credentials (``credentials``) whose certificate, key and client CAs a
    reload replaces for new connections; connections open already keep theirs until the
    server closes them for their age (``max_connection_age_s``).

    grpcio asks ``_fetch`` before each handshake (``grpc.dynamic_ssl_server_credentials``)
    and keeps what it has when it answers None. Whether clients must present a
    certificate (a ``tls_client_ca``) is fixed at start.

    Raises:
        ConfigError: as ``server_credentials``.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        client_ca_file: Path | None = None,
        *,
        clock: Clock | None = None,
    ):
        key, cert, ca = _tls_material(cert_file, key_file, client_ca_file)
        self.mutual = ca is not None
        self._clock = clock or SystemClock()
        self._next: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()
        self.credentials = grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca),
            # None is "no change" (grpcio's documentation), which the stubs leave out
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    def read(
        self, cert_file: Path, key_file: Path, client_ca_file: Path | None
    ) -> Callable[[], None]:
        """Read and check the files now, as at start; call the result to put them in
        force for the next connections.

        Raises:
            ConfigError: as ``server_credentials``; or ``client_ca_file`` would turn
                client certificates on or off; or the certificate has expired.
        """
        if (client_ca_file is not None) != self.mutual:
            raise ConfigError("tls_client_ca: added or removed; that takes a restart")
        key, cert, ca = _tls_material(cert_file, key_file, client_ca_file)
        # no client verifies an expired certificate: put in force (an old backup restored,
        # a renewal that failed), every new connection failed while the reload said
        # tls_renewed (review); the one in force may still be good
        expiry = _expiry(cert)
        if expiry is not None and expiry <= self._clock.now():
            when = datetime.datetime.fromtimestamp(expiry, datetime.UTC).isoformat()
            raise ConfigError(f"tls_cert: {cert_file} holds a certificate that expired at {when}")
        renewed = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        def renew() -> None:
            with self._lock:
                self._next = renewed

        return renew

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            renewed, self._next = self._next, None
        return renewed


def _tls_material(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> tuple[bytes, bytes, bytes | None]:
    """The key, certificate and client CAs, read and checked (``_check_tls``).

    Raises:
        ConfigError: as ``server_credentials``; or the certificate or key file changed
            while they were read.
    """
    cert = _read(cert_file, "tls_cert")
    key = _read(key_file, "tls_key")
    ca = _read(client_ca_file, "tls_client_ca") if client_ca_file is not None else None
    _check_tls(cert_file, cert, key_file, client_ca_file, ca)
    # OpenSSL checks the pair from the files, read again: the bytes read above must still
    # be theirs. A pair replaced between the reads (a Secret mount's ..data flipped,
    # tls.crt written before tls.key) passed the check, and grpcio, handed a certificate
    # with another one's key, kept the old pair while the reload said tls_renewed (review)
    if _read(cert_file, "tls_cert") != cert or _read(key_file, "tls_key") != key:
        raise ConfigError(
            f"tls_cert: {cert_file} or tls_key {key_file} changed while they were read; "
            "reload again once both are written"
        )
    return key, cert, ca


def _check_tls(
    cert_file: Path, cert: bytes, key_file: Path, ca_file: Path | None, ca: bytes | None
) -> None:
    """Refuse the TLS material grpcio would refuse only when the port is bound (after the
    data dir, database and keyring are created, as "cannot bind"): OpenSSL reads it here."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for name, path, pem in (("tls_cert", cert_file, cert), ("tls_client_ca", ca_file, ca)):
        if pem is None:
            continue
        # the certificate blocks only: text around them (a bundle's "# Issuer: …" comments,
        # `openssl x509 -text` output) may be any bytes, as grpcio reads them
        blocks = b"\n".join(_PEM_CERTIFICATE.findall(pem))
        try:  # every certificate in the file parsed (a CA store is only read here)
            if not blocks:
                raise ValueError("no certificate")
            context.load_verify_locations(cadata=blocks.decode("ascii"))
        except (ssl.SSLError, ValueError):
            raise ConfigError(f"{name}: {path} holds no PEM certificate it can read") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, ValueError):
        raise ConfigError(
            f"tls_key: {key_file} is not the private key of tls_cert's certificate "
            "(a PEM key, not encrypted)"
        ) from None
    except OSError as e:
        raise ConfigError(f"tls_key: cannot read {key_file}: {e.strerror}") from None


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*?-----END CERTIFICATE-----"
)


def _expiry(pem: bytes) -> float | None:
    """When the first certificate of ``pem`` (the server's own) expires, in seconds since
    the epoch: its notAfter, read from the DER (RFC 5280: ``Certificate`` → ``tbsCertificate``
    → ``validity``); None when it cannot be read so (OpenSSL has read it: let it be)."""
    block = _PEM_CERTIFICATE.search(pem)
    try:
        der = ssl.PEM_cert_to_DER_cert(block[0].decode("ascii")) if block else b""
        at = _der_item(der, _der_item(der, 0)[1])[1]  # into Certificate, tbsCertificate
        if der[at] == 0xA0:  # [0] version
            at = _der_item(der, at)[2]
        for _ in range(3):  # serialNumber, signature, issuer
            at = _der_item(der, at)[2]
        at = _der_item(der, _der_item(der, at)[1])[2]  # into validity, past notBefore
        tag, start, end = _der_item(der, at)
        text = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049
            text = ("19" if int(text[:2]) >= 50 else "20") + text
        moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def _der_item(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at ``at``: its tag, where its value starts and where it ends."""
    tag, size, at = der[at], der[at + 1], at + 2
    if size & 0x80:
        count = size & 0x7F
        size, at = int.from_bytes(der[at : at + count], "big"), at + count
    return tag, at, at + size


def _no_password() -> bytes:  # an encrypted key fails instead of prompting on a terminal
    return b""


def _read(path: Path, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def check_insecure_listen(listen: str, *, allowed: bool) -> None:
    """Refuse a plaintext port unless configured (``allowed``) and bound to loopback only.

    The server calls this before ``add_insecure_port``.

    Raises:
        ConfigError: naming ``listen`` (a non-loopback host) or ``tls_cert`` (not allowed).
    """
    if not allowed:
        raise ConfigError("tls_cert: TLS is required (plaintext listening is not enabled)")
    host = listen.rpartition(":")[0]
    if not is_loopback(host):
        raise ConfigError(
            "listen: a plaintext port may only bind to loopback (127.0.0.1, ::1); "
            "configure tls_cert and tls_key to listen on other addresses"
        )
