"""Rudder client SDK: stubs, typed results, intervention builders. No torch needed."""

from rudder.client.client import AsyncClient, Client, tls_credentials
from rudder.client.errors import (
                                  AlreadyExists,
                                  FailedPrecondition,
                                  InvalidArgument,
                                  NotFound,
                                  PermissionDenied,
                                  ResourceExhausted,
                                  RudderError,
                                  Unauthenticated,
                                  Unavailable,
)
from rudder.client.types import (
                                  Readout,
                                  Token,
                                  ablate,
                                  activate_code,
                                  add,
                                  clamp,
                                  direction,
                                  gate,
                                  guard,
                                  readouts,
                                  scale,
                                  scope,
                                  steer,
                                  when,
)

__all__ = [
    "AlreadyExists", "AsyncClient", "Client", "FailedPrecondition", "InvalidArgument", "NotFound", "PermissionDenied",
    "Readout", "ResourceExhausted", "RudderError", "Token", "Unauthenticated", "Unavailable", "ablate",
    "activate_code", "add", "clamp", "direction", "gate", "guard", "readouts", "scale", "scope", "steer",
    "tls_credentials", "when",
]
