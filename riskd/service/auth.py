"""Who may call what: the interceptor that identifies, authorizes and rate-limits each call.

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

Roles and the table of methods are ``riskd.service.policy``; the ``[auth]`` settings that
grant roles and limits, ``riskd.service.callers``; the counters behind the limits,
``riskd.service.limits``; the TLS credentials the certificates come through,
``riskd.service.tls``.

Servicers read the caller with ``current_identity()``. Nothing here logs a
request body, a token or PII: denials are logged with the method, the code and
the principal (``cert:<CN>``, ``token:<name>``) or, for a caller not identified,
its peer host (``peer:ipv4:10.0.0.7``); at a bounded rate, the refusals in
between counted on the next line (``unlogged_refusals``).
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc

from riskd.domain.clock import Clock, SystemClock
from riskd.service.callers import AuthConfig, Identity, principal_problem, token_digest
from riskd.service.interceptors import (
    Deferred,
    WrappedHandlers,
    parsed,
    rewrapped,
)
from riskd.service.limits import ExhaustedRefusals, StreamSlots, TokenBuckets, UnloggedRefusals
from riskd.service.policy import COSTS, MAX_STREAMS_PER_PEER, POLICY, PUBLIC, ROLES, UNMETERED

log = logging.getLogger("riskd.service.auth")

_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "riskd_identity", default=None
)


def current_identity() -> Identity | None:
    """The authenticated caller of the RPC this thread is serving (None outside one)."""
    return _current.get()


_RATE_LIMITED = "rate limit exceeded; retry later"


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
