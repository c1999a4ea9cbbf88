"""Who a caller is and what the ``[auth]`` settings grant it: identities, tokens, rate limits.

Where it sits: ``AuthConfig.from_mapping`` reads the ``[auth]`` table at start and on each
reload; the interceptor (``riskd.service.auth``) looks callers up in the result. Errors name
the bad key, never a token.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from riskd.config import unknown_key
from riskd.errors import ConfigError, InvalidArgumentError
from riskd.ledger.validate import check_actor
from riskd.service.policy import ANALYST, AUDITOR, CHECKOUT, OPERATOR, PUBLIC, ROLES


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
