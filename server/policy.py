"""What every door applies to a call, in one place: authentication, warm-up, the error map and
request counting. The gRPC interceptor (server.app) and the OpenAI door (server.openai_door) are
thin adapters over `Policy`: neither authenticates, counts or maps an error on its own."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from rudder.core.errors import AtCapacity, RudderError, Unauthenticated, Unavailable
from rudder.server.metrics import Metrics

log = logging.getLogger(__name__)

HTTP_STATUS = {  # gRPC code -> HTTP status, as grpc-gateway maps them
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503,
}

AUTH_MESSAGE = ("missing or wrong bearer token: send `authorization: Bearer <token>` (gRPC metadata; over HTTP the "
                "Authorization header, which the openai client sends as its api_key)")
WARMING_MESSAGE = ("warming up: the engine is loading and compiling the model; retry in a few seconds "
                   "(grpc.health.v1 reports SERVING once it is ready)")


@dataclass(frozen=True)
class Outcome:
    """How a call ended, for either door: the gRPC status name, its HTTP status, and the message."""

    code: str
    message: str
    http: int


def outcome(error: BaseException, where: str = "the server") -> Outcome:
    """The one error map. A domain error is its own code and message (an over-limit request is HTTP
    400, not 429: retrying it will not help; a server at capacity is 429); anything else is INTERNAL,
    logged here with its traceback, and the caller learns only where to look."""
    if isinstance(error, RudderError):
        code = error.code
        http = 400 if code == "RESOURCE_EXHAUSTED" and not isinstance(error, AtCapacity) else HTTP_STATUS.get(code, 500)
        return Outcome(code, str(error), http)
    log.error("unexpected error in %s", where, exc_info=error)
    return Outcome("INTERNAL", f"internal error in {where}; see the server log", 500)


class Policy:
    """A server's admission rules and request counter, shared by its doors."""

    def __init__(self, metrics: Metrics, token: str | None = None):
        self.metrics = metrics
        self._expected = f"Bearer {token}".encode() if token else None
        self.ready = False
        """set once the engine is warm (server.app): until then every call is UNAVAILABLE at once"""

    def admit(self, authorization: str | bytes | None) -> None:
        """Raise for a call that may not run: UNAUTHENTICATED without the bearer token (when the server
        has one), UNAVAILABLE while warming up. `authorization`: the header's or metadata's value."""
        if self._expected is not None:
            got = authorization.encode() if isinstance(authorization, str) else (authorization or b"")
            if not hmac.compare_digest(got, self._expected):
                raise Unauthenticated(AUTH_MESSAGE)
        if not self.ready:
            raise Unavailable(WARMING_MESSAGE)

    def count(self, method: str, code: str) -> None:
        """One finished call in `rudder:requests`, by method and gRPC status name (either door)."""
        self.metrics.requests.labels(method, code).inc()
