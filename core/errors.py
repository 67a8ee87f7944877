"""Domain errors. The server maps each class to one gRPC status code; the message
is shown to the user as is, so it says what was wrong and what to do instead."""

from __future__ import annotations


class RudderError(Exception):
    """Base class; `code` names the gRPC status the server answers with."""

    code = "INTERNAL"


class InvalidArgument(RudderError):
    code = "INVALID_ARGUMENT"


class NotFound(RudderError):
    code = "NOT_FOUND"


class AlreadyExists(RudderError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(RudderError):
    code = "RESOURCE_EXHAUSTED"


class AtCapacity(ResourceExhausted):
    """The server is at its limit of concurrent requests: the same request may succeed later (HTTP
    429), unlike a request over a per-request limit (HTTP 400)."""


class OutOfRange(RudderError):
    code = "OUT_OF_RANGE"


class Unauthenticated(RudderError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RudderError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(RudderError):
    code = "FAILED_PRECONDITION"


class Unavailable(RudderError):
    """The engine cannot serve the request now (it stopped or dropped it); retrying may work."""

    code = "UNAVAILABLE"


class ReadoutMissing(Unavailable):
    """A step's readouts never reached the front end (a worker or transport fault)."""


class ArtifactError(RudderError):
    """An artifact that cannot be attached to the model (a start-up error)."""

    code = "FAILED_PRECONDITION"


class TrainingError(RudderError):
    """Training cannot go on (a NaN loss, say); the message says what to change."""

    code = "ABORTED"
