"""Who may call what: TLS credentials, caller identity, roles, per-method policy, rate limits.

Where it sits: the outermost server interceptor, before riskd's error
interceptor. For each call it

1. identifies the caller: the client certificate's subject (CN is the
   principal, each OU naming a role is a role; ``cert_principals`` may grant
   more roles by CN) when mutual TLS is on, else a configured bearer token in
   the ``authorization`` metadata (``Bearer <token>``); no credentials at all
   is an anonymous caller, who holds ``anonymous_roles`` (none, unless
   configured; the embedded plaintext-loopback default grants ``checkout``
   only, so scoring works out of the box while money and admin need tokens).
   A malformed ``authorization`` header is ``UNAUTHENTICATED``; a certificate
   without a CN gives no identity, one whose ``cert:<CN>`` the ledger would refuse
   as actor (``principal_problem``) is ``PERMISSION_DENIED``;
2. looks the full method name up in ``POLICY`` (deny by default: a method
   missing from the table is ``PERMISSION_DENIED`` for everyone);
3. takes tokens from the caller's bucket (``RESOURCE_EXHAUSTED`` when empty):
   one per call, one per order for ``ScoreBatch`` (``COSTS``, capped at the
   burst); ``PUBLIC`` methods spend a separate bucket per caller under the
   ``PUBLIC`` limit, except the health ``Check`` (``UNMETERED``); refused calls
   spend their peer host's bucket of refusals (``AuthInterceptor``), so token
   guessing is throttled;
4. for a streaming call, takes a stream slot (``StreamSlots``): a peer host
   keeps at most ``MAX_STREAMS_PER_PEER`` streams open, and streams that hold
   an RPC thread (all but the non-blocking health ``Watch``) at most
   ``STREAM_THREADS`` of the server's RPC threads, which it adds beyond ``workers``,
   so open streams never stall scoring.

Roles: ``checkout`` (score, report outcomes), ``analyst`` (cases, replay,
penalties, compensation, decrypting a case's PII), ``auditor`` (reports and
verification, masked PII only), ``operator`` (fund top-ups, key rotation,
configuration). ``PUBLIC`` in a policy entry lets anyone call (health checks).

Servicers read the caller with ``current_identity()``. Nothing here logs a
request body, a token or PII: denials are logged with the method, the code and
the principal (``cert:<CN>``, ``token:<name>``) or, for a caller not identified,
its peer host (``peer:ipv4:10.0.0.7``); at a bounded rate, the refusals in
between counted on the next line (``unlogged_refusals``).
"""

from __future__ import annotations

import contextvars
import datetime
import hashlib
import logging
import re
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc

from riskd.config import is_loopback, unknown_key
from riskd.domain.clock import Clock, SystemClock
from riskd.errors import ConfigError, InvalidArgumentError
from riskd.ledger.validate import check_actor
from riskd.service.interceptors import (
    Deferred,
    Refused,
    Undecodable,
    WrappedHandlers,
    parsed,
    rewrapped,
)

log = logging.getLogger("riskd.service.auth")

CHECKOUT: Final = "checkout"
ANALYST: Final = "analyst"
AUDITOR: Final = "auditor"
OPERATOR: Final = "operator"
ROLES: Final = frozenset({CHECKOUT, ANALYST, AUDITOR, OPERATOR})
PUBLIC: Final = "public"
"""Pseudo-role in ``POLICY``: the method needs no credentials."""

_SCORING = "/riskd.v1.ScoringService/"
_LEDGER = "/riskd.v1.LedgerService/"
_EVIDENCE = "/riskd.v1.EvidenceService/"
_HEALTH = "/grpc.health.v1.Health/"

POLICY: dict[str, frozenset[str]] = {
    _SCORING + "Score": frozenset({CHECKOUT}),
    _SCORING + "ScoreBatch": frozenset({CHECKOUT}),
    _SCORING + "ReportOutcome": frozenset({CHECKOUT}),
    # Money moves: merchants' deposits and the fund are the platform operator's business;
    # penalties and compensation follow an analyst's case; statements are read-only.
    _LEDGER + "RegisterShop": frozenset({OPERATOR}),
    _LEDGER + "Deposit": frozenset({OPERATOR}),
    _LEDGER + "Withdraw": frozenset({OPERATOR}),
    _LEDGER + "TopUpFund": frozenset({OPERATOR}),
    _LEDGER + "CollectClaim": frozenset({OPERATOR}),
    _LEDGER + "WriteOffClaim": frozenset({OPERATOR}),
    _LEDGER + "UnfreezeShop": frozenset({OPERATOR}),
    _LEDGER + "PenalizeShop": frozenset({ANALYST}),
    _LEDGER + "OpenDispute": frozenset({ANALYST}),
    _LEDGER + "CompensateBuyer": frozenset({ANALYST}),
    _LEDGER + "PayLateShipmentCoupon": frozenset({ANALYST, OPERATOR}),
    _LEDGER + "GetAccountStatement": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "GetShopStatement": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "GetDisputeStatement": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "ListAccounts": frozenset({ANALYST, AUDITOR, OPERATOR}),
    _LEDGER + "VerifyLedger": frozenset({AUDITOR, OPERATOR}),
    # Decrypting a decision's PII is an analyst's audited act; auditors read the audit
    # trail (which holds no PII), never the plaintext.
    _EVIDENCE + "RevealOrderPii": frozenset({ANALYST}),
    _EVIDENCE + "ListPiiAccess": frozenset({ANALYST, AUDITOR}),
    _HEALTH + "Check": frozenset({PUBLIC}),
    _HEALTH + "Watch": frozenset({PUBLIC}),
    # These name every service and message: any known caller (grpcurl and friends), never
    # an unauthenticated one.
    _HEALTH + "List": ROLES,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ROLES,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ROLES,
}
"""Full gRPC method name → roles allowed to call it. Anything not listed is denied."""

UNMETERED: Final = frozenset({_HEALTH + "Check"})
"""``PUBLIC`` methods no rate limit applies to: a health check is cheaper to answer than to
refuse, and a load balancer's checks share their address (an L7 proxy's) with every client
behind it, so a bucket per address let a neighbour's flood get the backend ejected
(review). A ``Watch`` stays bounded: it opens a stream."""

_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "riskd_identity", default=None
)


def current_identity() -> Identity | None:
    """The authenticated caller of the RPC this thread is serving (None outside one)."""
    return _current.get()


# -- identities and configuration ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller: ``principal`` is ``cert:<CN>``, ``token:<name>`` or, for an anonymous
    caller granted ``anonymous_roles``, ``peer:<address>`` (``anonymous``)."""

    principal: str
    roles: frozenset[str]
    anonymous: bool = False


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``rate`` calls per second on average, bursts up to ``burst``."""

    rate: float
    burst: int

    @classmethod
    def parse(cls, text: str, key: str) -> RateLimit:
        """``"200/s:400"`` → ``RateLimit(200.0, 400)``.

        >>> RateLimit.parse("200/s:400", "k")
        RateLimit(rate=200.0, burst=400)
        """
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)/s:([0-9]+)\s*", text)
        if match is None or float(match[1]) <= 0 or int(match[2]) < 1:
            raise ConfigError(f"{key}: expected RATE/s:BURST with positive numbers")
        return cls(float(match[1]), int(match[2]))


DEFAULT_RATE_LIMITS: Final[Mapping[str, RateLimit]] = {
    CHECKOUT: RateLimit(20_000.0, 40_000),
    ANALYST: RateLimit(50.0, 100),
    AUDITOR: RateLimit(20.0, 50),
    OPERATOR: RateLimit(10.0, 20),
    PUBLIC: RateLimit(50.0, 100),
}


def token_digest(token: str) -> str:
    """What the configuration stores instead of a bearer token: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who the server trusts, and how fast each role may call.

    Attributes:
        tokens: ``token_digest(token)`` → identity, for callers without client certificates.
        cert_principals: certificate CN → roles granted in addition to the OU roles.
        ou_roles: take roles from the certificate's OU fields (the CA is riskd's own).
        rate_limits: role → limit; a caller gets its most generous role's limit;
            ``PUBLIC`` is the limit of anonymous callers, per peer address, whatever
            their ``anonymous_roles`` (the stricter of the two applies: see
            ``anonymous_within_public``), of each
            caller's calls to ``PUBLIC`` methods, and of each peer's refused calls.
        anonymous_roles: roles of a caller with no credentials (per peer address).
        anonymous_within_public: hold anonymous callers to the ``PUBLIC`` limit too; off
            only for the embedded default (plaintext on loopback, no ``[auth]`` table),
            whose anonymous caller is the local checkout and has no ``public`` to set.
    """

    tokens: Mapping[str, Identity] = field(default_factory=dict)
    cert_principals: Mapping[str, frozenset[str]] = field(default_factory=dict)
    ou_roles: bool = True
    rate_limits: Mapping[str, RateLimit] = field(default_factory=lambda: DEFAULT_RATE_LIMITS)
    anonymous_roles: frozenset[str] = frozenset()
    anonymous_within_public: bool = True

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> AuthConfig:
        """Build from the ``[auth]`` table of the TOML configuration::

            [auth]
            ou_roles = true
            anonymous_roles = ["checkout"]   # default: none
            [auth.tokens]           # sha256:<64 hex of the token> (or the token) = "name:role,role"
            "sha256:9f86d0..." = "checkout-gw:checkout"
            [auth.cert_principals]  # CN = "role,role"
            "ops-laptop-7" = "operator"
            [auth.rate_limits]      # role = "RATE/s:BURST"
            analyst = "20/s:40"

        A blank token, or the digest of the empty one, is refused: no well-formed
        ``Bearer`` header carries it.

        Raises:
            ConfigError: naming the bad key (never a token).
        """
        known = {"tokens", "cert_principals", "ou_roles", "rate_limits", "anonymous_roles"}
        for key in raw:
            if key not in known:
                raise unknown_key("auth.", key)
        ou = raw.get("ou_roles", True)
        if not isinstance(ou, bool):
            raise ConfigError("auth.ou_roles: expected true or false")
        return cls(
            tokens=_parse_tokens(_table(raw, "tokens")),
            cert_principals=_parse_cert_principals(_table(raw, "cert_principals")),
            ou_roles=ou,
            anonymous_roles=_anonymous_roles(raw.get("anonymous_roles", [])),
            rate_limits={
                **DEFAULT_RATE_LIMITS,
                **{
                    role: RateLimit.parse(
                        _str(v, f"auth.rate_limits.{role}"), f"auth.rate_limits.{role}"
                    )
                    for role, v in _checked_roles(_table(raw, "rate_limits"), public=True).items()
                },
            },
        )

    @classmethod
    def with_tokens(cls, tokens: Mapping[str, Identity], **kwargs: Any) -> AuthConfig:
        """Convenience for tests and embedding: plaintext token → identity (stored hashed)."""
        return cls(tokens={token_digest(t): i for t, i in tokens.items()}, **kwargs)

    @property
    def public(self) -> RateLimit:
        """The ``PUBLIC`` limit: anonymous callers, ``PUBLIC`` methods, refused calls."""
        return self.rate_limits.get(PUBLIC, DEFAULT_RATE_LIMITS[PUBLIC])

    def limit_for(self, roles: frozenset[str], *, anonymous: bool = False) -> RateLimit:
        """The most generous of ``roles``' limits; for an ``anonymous`` caller (no token or
        certificate, per peer address) never more than the ``PUBLIC`` limit (unless
        ``anonymous_within_public`` is off)."""
        public = self.public
        limits = [self.rate_limits[r] for r in roles if r in self.rate_limits]
        if not limits:
            return public
        best = max(limits, key=lambda lim: (lim.rate, lim.burst))
        if anonymous and self.anonymous_within_public:
            return RateLimit(min(best.rate, public.rate), min(best.burst, public.burst))
        return best


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"auth.{key}: expected a table")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string")
    return value


def _parse_roles(value: Any, key: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in _str(value, key).split(",") if r.strip())
    if not roles or not roles <= ROLES:
        raise ConfigError(f"{key}: roles must be among {', '.join(sorted(ROLES))}")
    return roles


def _anonymous_roles(value: Any) -> frozenset[str]:
    key = "auth.anonymous_roles"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if value in ("", None):
        return frozenset()
    return _parse_roles(value, key)


def _checked_roles(table: Mapping[str, Any], *, public: bool) -> Mapping[str, Any]:
    allowed = ROLES | {PUBLIC} if public else ROLES
    for role in table:
        if role not in allowed:
            raise unknown_key("auth.rate_limits.", role, "role")
    return table


def _parse_tokens(table: Mapping[str, Any]) -> dict[str, Identity]:
    """Digest → identity. Refused (review): a token listed twice (as itself and as its
    digest: the last entry's roles won silently), a name listed twice (the two shared one
    principal and one rate bucket), a name the ledger refuses as an actor (every write of
    its caller failed)."""
    tokens: dict[str, Identity] = {}
    for i, (token, value) in enumerate(table.items()):
        key = f"auth.tokens[{i}]"  # never the token itself
        name, sep, roles = _str(value, key).partition(":")
        if not sep or not name.strip():
            raise ConfigError(f'{key}: expected "name:role,role"')
        digest, principal = _digest_of(token, key), f"token:{name.strip()}"
        if digest in tokens:
            raise ConfigError(f"{key}: the same token as another entry (as itself or its digest)")
        if any(other.principal == principal for other in tokens.values()):
            raise ConfigError(f"{key}: the name of another entry (each token names one caller)")
        reason = principal_problem(principal)
        if reason is not None:
            raise ConfigError(f"{key}: the name is not a valid ledger actor ({reason})")
        tokens[digest] = Identity(principal, _parse_roles(roles, key))
    return tokens


def _parse_cert_principals(table: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """CN → roles. Refused: a CN no certificate's could match (blank, or with blanks
    around it), and one the ledger refuses as actor (as ``cert:<CN>``): a certificate
    with it is refused every call (``principal_problem``)."""
    principals: dict[str, frozenset[str]] = {}
    for i, (cn, value) in enumerate(table.items()):
        if not cn.strip():
            reason: str | None = "must not be blank"
        elif cn != cn.strip():  # a certificate's CN is read without them: it never matched
            reason = "must not start or end with whitespace"
        else:
            reason = principal_problem(f"cert:{cn}")
        if reason is not None:  # named by its place: the CN may be what is wrong
            raise ConfigError(f"auth.cert_principals[{i}]: the CN {reason}")
        principals[cn] = _parse_roles(value, f"auth.cert_principals[{i}]")
    return principals


def principal_problem(principal: str) -> str | None:
    """What the ledger's actor rule (``check_actor``) finds wrong with ``principal``, in
    words that never quote it; None when it may name a caller.

    >>> principal_problem("cert:gw-1") is None
    True
    >>> principal_problem("cert:gw\u202e1")
    'must not contain NUL or control characters'
    """
    try:
        check_actor(principal)
    except InvalidArgumentError as e:
        return str(e).removeprefix(f"{e.field}: ")
    return None


_EMPTY_DIGEST: Final = token_digest("")


def _digest_of(token: str, key: str) -> str:
    """A configured token's ``sha256:<hex>``: exactly 64 hex digits (lowercased, as
    ``token_digest`` writes them), never the digest of an empty token; a plaintext token
    must be non-blank and without surrounding whitespace (``Bearer`` values are stripped,
    so it could never match)."""
    if token[:7].lower() == "sha256:":
        if not re.fullmatch(r"[0-9a-fA-F]{64}", token[7:]):
            raise ConfigError(f"{key}: a sha256: digest must be 64 hexadecimal digits")
        digest = "sha256:" + token[7:].lower()
    elif not token.strip():
        raise ConfigError(f"{key}: a token must not be empty")
    elif token != token.strip():
        raise ConfigError(f"{key}: a token must not start or end with whitespace")
    else:
        digest = token_digest(token)
    if digest == _EMPTY_DIGEST:
        raise ConfigError(f"{key}: a token must not be empty (that is the empty token's digest)")
    return digest


# -- transport security ----------------------------------------------------------------------


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
    reload replaces for new connections; connections open already keep theirs.

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


# -- rate limits -----------------------------------------------------------------------------


class TokenBuckets:
    """One token bucket per caller; thread-safe; bounded number of callers remembered."""

    def __init__(self, clock: Clock, *, max_callers: int = 10_000) -> None:
        self._clock = clock
        self._max = max_callers
        self._buckets: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def take(self, caller: str, limit: RateLimit, cost: int = 1) -> bool:
        """Spend ``cost`` tokens of ``caller``'s bucket; False (nothing spent) when it holds
        fewer. A cost above ``limit.burst`` could never be paid: callers cap it."""
        with self._lock:
            bucket = self._refill(caller, limit)
            if bucket[0] < cost:
                return False
            bucket[0] -= cost
            return True

    def holds(self, caller: str, limit: RateLimit, cost: int = 1) -> bool:
        """Whether ``caller``'s bucket holds ``cost`` tokens now (nothing spent)."""
        with self._lock:
            return self._refill(caller, limit)[0] >= cost

    def _refill(self, caller: str, limit: RateLimit) -> list[float]:
        now = self._clock.monotonic()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._prune()
            bucket = self._buckets[caller] = [float(limit.burst), now]
        bucket[0] = min(float(limit.burst), bucket[0] + (now - bucket[1]) * limit.rate)
        bucket[1] = now
        return bucket

    def _prune(self) -> None:
        # Forget the least recently seen half; a forgotten caller starts with a full bucket,
        # which is what an idle caller would have anyway.
        oldest = sorted(self._buckets, key=lambda c: self._buckets[c][1])
        for caller in oldest[: len(oldest) // 2 + 1]:
            del self._buckets[caller]


class StreamSlots:
    """Streaming calls open at once: at most ``per_peer`` from one peer host, and at most
    ``holding`` in total of those that hold an RPC thread while open (reflection; a health
    ``Watch`` does not), so streams never take every RPC thread from unary calls."""

    def __init__(self, *, holding: int, per_peer: int) -> None:
        self._max_holding = holding
        self._per_peer = per_peer
        self._holding = 0
        self._peers: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, peer: str, *, holds_thread: bool) -> Callable[[], None] | None:
        """A slot for one stream (call the result once it ends), or None when full."""
        with self._lock:
            if self._peers.get(peer, 0) >= self._per_peer:
                return None
            if holds_thread and self._holding >= self._max_holding:
                return None
            self._peers[peer] = self._peers.get(peer, 0) + 1
            self._holding += holds_thread
        closed = threading.Event()

        def close() -> None:
            with self._lock:
                if closed.is_set():
                    return
                closed.set()
                self._holding -= holds_thread
                self._peers[peer] -= 1
                if not self._peers[peer]:
                    del self._peers[peer]

        return close


MAX_STREAMS_PER_PEER: Final = 32
"""Streaming calls (health ``Watch``, reflection) one peer host may keep open at once."""


REFUSED_BYTES_PER_TOKEN: Final = 1024
"""A batch refused unparsed (``riskd.service.interceptors.Refused``: too large, too many
orders or items) or unparsable (``Undecodable``) costs a token per this many of its bytes
(a checkout order is ~0.3–1 KB), as it would have per order; reading and refusing one
costs at most ~0.5 ms of CPU per token (``benchmarks/load/screen_cost.py``)."""


def _orders(request: Any) -> int:
    if isinstance(request, Refused):
        return request.size // REFUSED_BYTES_PER_TOKEN
    if isinstance(request, Undecodable):
        return len(request.data) // REFUSED_BYTES_PER_TOKEN
    return len(getattr(request, "orders", ()))


_RATE_LIMITED = "rate limit exceeded; retry later"

COSTS: Final[Mapping[str, Callable[[Any], int]]] = {_SCORING + "ScoreBatch": _orders}
"""Methods whose call spends more than one rate-limit token: ``ScoreBatch`` one per order,
capped at the caller's burst (so a batch is never refused for its size alone)."""


# -- the interceptor -------------------------------------------------------------------------

Reject = Callable[[str, grpc.StatusCode], None]

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, caller: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.caller = caller  # the principal when known, else the peer host (for the log)
        self.throttled = False  # refused by the peer's empty refusal bucket: not logged


_REFUSED = "refused:"
"""Key prefix of a peer's bucket of refused calls (``TokenBuckets``)."""
_PUBLIC_KEY = "public:"
"""Key prefix of a caller's bucket for ``PUBLIC`` methods, apart from its own."""


class AuthInterceptor(_Interceptor):
    """Authenticate, authorize (deny by default) and rate-limit every call.

    Rate limits: a call spends its caller's bucket (``COSTS``: a batch per order);
    ``PUBLIC`` methods spend a bucket of their own per caller under the ``PUBLIC`` limit,
    so health watches never eat a caller's quota; ``UNMETERED`` ones (the health ``Check``)
    spend nothing. Every refused call (``UNAUTHENTICATED``,
    ``PERMISSION_DENIED``) spends a token of its peer host's refusal bucket, also under the
    ``PUBLIC`` limit; while that bucket is empty the peer's calls that would be refused
    answer ``RESOURCE_EXHAUSTED``: failures cost little and log at its rate (those it
    refuses are counted, ``UnloggedRefusals``, and ``on_reject`` still sees each). A call
    over its caller's own quota logs a line a second per caller at most
    (``ExhaustedRefusals``; ``on_reject`` sees each). A valid
    credential is always served (a checkout gateway is never held up by a misconfigured
    neighbour behind the same address); guessing a 256-bit token is hopeless anyway.

    Args:
        config: tokens, certificate principals and rate limits.
        policy: full method name → allowed roles (``POLICY`` by default).
        clock: for the token buckets.
        on_reject: called with (method, code) for every refused call (metrics).
        max_holding_streams: streaming calls that hold an RPC thread, open at once (the
            server allows ``STREAM_THREADS``, threads it adds beyond ``workers`` for
            them); more answer ``RESOURCE_EXHAUSTED``.
        max_streams_per_peer: streaming calls one peer host may keep open at once.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        policy: Mapping[str, frozenset[str]] = POLICY,
        clock: Clock | None = None,
        on_reject: Reject | None = None,
        max_holding_streams: int = 2,
        max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
    ) -> None:
        self._config = config  # swapped whole by reconfigure: each call reads it once
        self._policy = dict(policy)
        self._buckets = TokenBuckets(clock or SystemClock())
        self._streams = StreamSlots(holding=max_holding_streams, per_peer=max_streams_per_peer)
        self._on_reject = on_reject
        self._unlogged = UnloggedRefusals()
        self._exhausted = ExhaustedRefusals(clock or SystemClock())
        self._guarded = WrappedHandlers()

    @property
    def config(self) -> AuthConfig:
        """The settings new calls are admitted under."""
        return self._config

    def reconfigure(self, config: AuthConfig) -> None:
        """Admit new calls under ``config`` (a reload: a revoked token is refused from the
        next call on); calls admitted already, and open streams, go on."""
        self._config = config

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method: str = details.method
        guarded = self._guarded.get(method, handler)
        if guarded is None:
            admit = self._admitter(method, _stream_kind(handler))
            guarded = self._guarded.keep(method, handler, _guard(handler, admit))
        return guarded

    def _admitter(self, method: str, stream: _Stream | None) -> Admit:
        """``method``'s admission check: identify, authorize, rate-limit (refuses by abort).
        ``stream``: None for a unary response, else whether the stream holds an RPC thread."""

        def admit(context: grpc.ServicerContext, request: Any) -> Admitted:
            peer = "peer:" + _peer_host(context.peer())
            try:
                identity = self._admit(method, request, context, peer)
                if stream is not None:
                    return identity, self._open_stream(context, peer, stream)
                return identity, _nothing
            except _Denied as denied:
                self._reject(method, denied, context, peer)
                raise AssertionError("unreachable: context.abort raises") from None

        return admit

    def _admit(
        self, method: str, request: Any, context: grpc.ServicerContext, peer: str
    ) -> Identity | None:
        allowed = self._policy.get(method)
        config, identity = self._config, None  # one call, one version of the settings
        try:
            identity = self._identify(context, peer, config)
            if allowed is None:
                raise _Denied(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not allowed")
            if PUBLIC not in allowed:
                # an anonymous caller may hold a credential that would do: ask for it
                if identity is None or (identity.anonymous and not identity.roles & allowed):
                    raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "credentials required")
                if not identity.roles & allowed:
                    raise _Denied(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"{method} is not allowed for this caller",
                    )
        except _Denied as denied:
            denied.caller = identity.principal if identity else peer
            if denied.code is not grpc.StatusCode.RESOURCE_EXHAUSTED and not self._buckets.take(
                _REFUSED + peer, config.public
            ):
                denied.code, denied.message = grpc.StatusCode.RESOURCE_EXHAUSTED, _TOO_MANY_REFUSED
                denied.throttled = True
            raise
        if method not in UNMETERED:
            self._charge(method, request, identity, peer, config, public=PUBLIC in allowed)
        return identity

    def _charge(
        self,
        method: str,
        request: Any,
        identity: Identity | None,
        peer: str,
        config: AuthConfig,
        *,
        public: bool,
    ) -> None:
        caller = identity.principal if identity else peer
        if public:
            caller, limit = _PUBLIC_KEY + caller, config.public
        else:
            limit = config.limit_for(
                identity.roles if identity else frozenset(),
                anonymous=identity is None or identity.anonymous,
            )
        cost = 1
        if method in COSTS:
            # a large request is parsed only now (riskd.service.interceptors.Deferred), and
            # only for a caller with a token left: a refused call costs no parse
            if isinstance(request, Deferred) and not self._buckets.holds(caller, limit):
                raise _Denied(grpc.StatusCode.RESOURCE_EXHAUSTED, _RATE_LIMITED, caller)
            cost = COSTS[method](parsed(request))
        if not self._buckets.take(caller, limit, max(1, min(cost, limit.burst))):
            raise _Denied(grpc.StatusCode.RESOURCE_EXHAUSTED, _RATE_LIMITED, caller)

    def _identify(
        self, context: grpc.ServicerContext, peer: str, config: AuthConfig
    ) -> Identity | None:
        identity = _from_certificate(context.auth_context(), config)
        if identity is not None:
            return identity
        token = _bearer(context.invocation_metadata())
        if token is None:
            if config.anonymous_roles:
                return Identity(peer, config.anonymous_roles, anonymous=True)
            return None
        found = config.tokens.get(token_digest(token))
        if found is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        return found

    def _open_stream(
        self, context: grpc.ServicerContext, peer: str, stream: _Stream
    ) -> Callable[[], None]:
        """Take a stream slot; it is freed by the call's end callback, or by the returned
        ``close`` (idempotent), which a blocking stream's wrapper calls when it finishes:
        grpcio sometimes runs no callback for a stream it aborts (request bytes that do not
        parse), and the slots leaked until a restart (review)."""
        close = self._streams.open(peer, holds_thread=stream.holds_thread)
        if close is None:
            raise _Denied(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams; retry later", peer
            )
        if not context.add_callback(close):  # the call already ended
            close()
        return close

    def _reject(
        self, method: str, denied: _Denied, context: grpc.ServicerContext, peer: str
    ) -> None:
        if denied.throttled:
            self._unlogged.count_one(peer)
        elif denied.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            # the caller's own quota or stream slots: a line a second per caller at most
            # (review: 20,000 over-quota calls a second were as many log lines)
            unlogged = self._exhausted.due_one(denied.caller)
            if unlogged is not None:
                self._log_refusal(method, denied, peer, unlogged)
        else:
            self._log_refusal(method, denied, peer, 0)
        if self._on_reject is not None:
            self._on_reject(method, denied.code)
        context.abort(denied.code, denied.message)

    def _log_refusal(self, method: str, denied: _Denied, peer: str, unlogged: int) -> None:
        """One ``call refused`` line; ``unlogged_refusals``: the peer's refusals since its
        last line that were counted, not logged (``UnloggedRefusals``), and the caller's
        over its quota (``ExhaustedRefusals``)."""
        fields: dict[str, object] = {
            "method": method,
            "code": denied.code.name,
            "principal": denied.caller,
        }
        unlogged += self._unlogged.take(peer)
        if unlogged:
            fields["unlogged_refusals"] = unlogged
        log.warning("call refused", extra={"fields": fields})


_TOO_MANY_REFUSED: Final = "too many refused calls from this address; retry later"


class UnloggedRefusals:
    """Calls refused by a peer's empty refusal bucket, counted per peer host instead of
    logged one by one (1,000 guesses were 1,000 log lines: review); the peer's next logged
    refusal carries the count. At most ``max_peers`` counts are kept: past that the oldest
    is logged on its own line."""

    def __init__(self, *, max_peers: int = 10_000) -> None:
        self._max = max_peers
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count_one(self, peer: str) -> None:
        evicted = None
        with self._lock:
            if peer not in self._counts and len(self._counts) >= self._max:
                oldest = next(iter(self._counts))
                evicted = oldest, self._counts.pop(oldest)
            self._counts[peer] = self._counts.get(peer, 0) + 1
        if evicted is not None:
            fields = {"principal": evicted[0], "unlogged_refusals": evicted[1]}
            log.warning("calls refused, not logged one by one", extra={"fields": fields})

    def take(self, peer: str) -> int:
        """The count for ``peer`` since its last logged refusal (now zero)."""
        with self._lock:
            return self._counts.pop(peer, 0)


class ExhaustedRefusals:
    """Calls refused because their caller spent its own quota (``RESOURCE_EXHAUSTED``:
    its rate limit, its stream slots), logged at most once per ``interval_s`` per caller:
    ``due_one`` says whether this one is logged, and with how many unlogged since the
    caller's last line. At most ``max_callers`` are remembered: past that the one logged
    longest ago is forgotten (its count, if any, logged on its own line)."""

    def __init__(self, clock: Clock, *, interval_s: float = 1.0, max_callers: int = 10_000) -> None:
        self._clock = clock
        self._interval = interval_s
        self._max = max_callers
        self._callers: dict[str, tuple[float, int]] = {}  # caller → (last line, unlogged)
        self._lock = threading.Lock()

    def due_one(self, caller: str) -> int | None:
        """None: this refusal is counted, not logged; else log it, with this many unlogged
        refusals of ``caller`` since its last line."""
        now, evicted = self._clock.monotonic(), None
        with self._lock:
            last = self._callers.get(caller)
            if last is not None and now - last[0] < self._interval:
                self._callers[caller] = last[0], last[1] + 1
                return None
            if last is None and len(self._callers) >= self._max:
                oldest = next(iter(self._callers))  # in the order of their last lines
                evicted = oldest, self._callers.pop(oldest)[1]
            self._callers.pop(caller, None)
            self._callers[caller] = now, 0
        if evicted is not None and evicted[1]:
            fields = {"principal": evicted[0], "unlogged_refusals": evicted[1]}
            log.warning("calls refused, not logged one by one", extra={"fields": fields})
        return 0 if last is None else last[1]


@dataclass(frozen=True, slots=True)
class _Stream:
    holds_thread: bool


def _stream_kind(handler: grpc.RpcMethodHandler[Any, Any]) -> _Stream | None:
    """None for a unary response; else whether grpcio runs the stream on an RPC thread for
    as long as it is open (it does unless the behaviour is ``experimental_non_blocking``)."""
    behaviour = handler.unary_stream or handler.stream_stream
    if behaviour is None:
        return None
    return _Stream(holds_thread=not getattr(behaviour, "experimental_non_blocking", False))


def _from_certificate(auth: Mapping[str, Any], config: AuthConfig) -> Identity | None:
    """The caller a client certificate names under ``config`` (``auth``: grpcio's auth
    context); None without a certificate or without a CN."""
    names = auth.get("x509_common_name")
    cn = names[0].decode("utf-8", "replace").strip() if names else ""
    if not cn:
        return None  # no certificate, or one without a CN: no identity from it
    reason = principal_problem(f"cert:{cn}")
    if reason is not None:
        # a CN the ledger refuses as actor (a control character, a bidi override) was
        # written as is to the PII audit trail, and money calls failed as a bad "actor"
        # argument the request has no field for (review)
        raise _Denied(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the client certificate's CN cannot name a caller: cert:<CN> {reason}",
        )
    roles = set(config.cert_principals.get(cn, frozenset()))
    if config.ou_roles:
        for subject in auth.get("x509_subject", ()):
            roles.update(
                ou for ou in subject_ous(subject.decode("utf-8", "replace")) if ou in ROLES
            )
    return Identity(f"cert:{cn}", frozenset(roles))


def subject_ous(subject: str) -> list[str]:
    r"""The OU values of an RFC 2253 subject string (``\,`` escapes honoured).

    >>> subject_ous("CN=gw-1,OU=checkout,OU=ops\\,team,O=riskd")
    ['checkout', 'ops,team']
    """
    ous: list[str] = []
    for rdn in re.split(r"(?<!\\)[,+]", subject):
        attr, _, value = rdn.partition("=")
        if attr.strip().upper() == "OU":
            ous.append(re.sub(r"\\(.)", r"\1", value.strip()))
    return ous


def _bearer(metadata: Sequence[Any] | None) -> str | None:
    """The token of the first ``authorization`` header, None without one.

    Raises:
        _Denied: ``UNAUTHENTICATED`` for a header that is not ``Bearer <token>`` (never
            looked up: it is not an empty token).
    """
    for item in metadata or ():
        if item.key == "authorization":
            value = item.value if isinstance(item.value, str) else item.value.decode()
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return str(token.strip())
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed authorization header: expected Bearer <token>",
            )
    return None


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555" → the host part (ports change per connection)
    kind, _, rest = peer.partition(":")
    return kind + ":" + rest.rpartition(":")[0] if ":" in rest else peer


Admitted = tuple[Identity | None, Callable[[], None]]
Admit = Callable[[grpc.ServicerContext, Any], Admitted]
"""Admits a call (context, request; None for a request stream) or aborts it: the caller,
and what frees the call's stream slot (nothing for a unary response)."""


def _nothing() -> None:
    pass


def _guard(
    handler: grpc.RpcMethodHandler[Any, Any], admit: Admit
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with ``admit`` run first and the identity visible to the servicer."""
    wraps = {"unary_unary": _unary, "unary_stream": _streaming,
             "stream_unary": _unary, "stream_stream": _streaming}  # fmt: skip
    return rewrapped(
        handler,
        lambda kind, inner: wraps[kind](inner, admit, request=kind.startswith("unary_")),
        handler.request_deserializer,
    )


def _unary(
    inner: Callable[[Any, Any], Any], admit: Admit, *, request: bool
) -> Callable[[Any, Any], Any]:
    def call(req: Any, context: grpc.ServicerContext) -> Any:
        reset = _current.set(admit(context, req if request else None)[0])
        try:
            return inner(req, context)
        finally:
            _current.reset(reset)

    return call


def _streaming(inner: Callable[..., Any], admit: Admit, *, request: bool) -> Callable[..., Any]:
    if getattr(inner, "experimental_non_blocking", False):
        # grpcio passes a callback and frees the RPC thread when this returns (health Watch)
        def start(req: Any, context: grpc.ServicerContext, send_response_callback: Any) -> Any:
            # the slot stays taken after this returns: the call's end callback frees it
            reset = _current.set(admit(context, req if request else None)[0])
            try:
                return inner(req, context, send_response_callback)
            finally:
                _current.reset(reset)

        return start

    def call(req: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        identity, close = admit(context, req if request else None)
        _current.set(identity)
        try:
            yield from inner(req, context)
        finally:
            close()  # also when grpcio runs no end callback (AuthInterceptor._open_stream)
            # A generator may be finished from another context; clear rather than reset.
            _current.set(None)

    return call
