"""gRPC status codes mapped to typed exceptions."""

from __future__ import annotations

import grpc


class RudderError(Exception):
    """A call failed; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(RudderError): ...
class NotFound(RudderError): ...
class AlreadyExists(RudderError): ...
class ResourceExhausted(RudderError): ...
class FailedPrecondition(RudderError): ...
class PermissionDenied(RudderError): ...
class Unauthenticated(RudderError): ...
class Unavailable(RudderError): ...
class DeadlineExceeded(RudderError): ...
class Cancelled(RudderError): ...
class Internal(RudderError): ...


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(e: grpc.RpcError) -> RudderError:
    code = e.code()
    return _BY_CODE.get(code, Internal)(code, e.details() or "")
