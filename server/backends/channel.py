"""The one channel from vLLM's workers to the front end: typed, versioned msgspec messages.

Each forward step that steered or read, the first worker sends one `StepRecord` over a local
zmq socket (msgpack, no pickle): for every row of a steering or reading request that produced a
token (or a prompt readout), a `Row` with Rudder's own request id (carried as data: the front
end puts it in `SamplingParams.extra_args`, the worker reads it back), the row's absolute
position, its readouts, whether its steering overflowed, and a guard that fired there.

The contract, where readouts and tokens meet (`VllmEngine.generate`): the worker sends a step's
rows before vLLM's output of that step reaches the front end, so the front end awaits the row of
each token it streams, keyed by (request, position), for at most READOUT_WAIT_S. A row seen twice
(a request preempted and recomputed) keeps the first.

A message the front end cannot read is logged and counted; the requests its header names (when
that much can be read) fail with UNAVAILABLE, the others go on. A message of another version is
refused the same way, naming both versions.
"""

from __future__ import annotations

import msgspec

from rudder.core.errors import Unavailable
from rudder.server.backends.base import GuardHit, TokenReadout

VERSION = 1
REQUEST_ID_KEY = "rudder_request"  # in SamplingParams.extra_args: Rudder's request id, sent back with its rows


class Row(msgspec.Struct, array_like=True):
    """One row of a steering or reading request: its readouts, as the request asked for them."""

    request: str
    position: int
    readouts: list[TokenReadout]
    broken: bool = False  # the request's steering overflowed (sticky: set on every later row)
    hit: GuardHit | None = None  # a guard that fired at this row


class StepRecord(msgspec.Struct, kw_only=True):
    """One forward step's rows. `requests` (the ids the rows name) leads, so that a front end that
    cannot read the rest still knows whose rows they were."""

    version: int = VERSION
    requests: list[str]
    hook_s: float
    rows: list[Row]


class _Header(msgspec.Struct):
    """What a front end of any version can read of a record: who it is for, and its version."""

    version: int = -1
    requests: list[str] = []


class ChannelError(Unavailable):
    """A message the front end cannot use; `requests`: whose rows it held, where its header says."""

    def __init__(self, message: str, requests: list[str]):
        super().__init__(message)
        self.requests = requests


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepRecord)
_header = msgspec.msgpack.Decoder(_Header)


def encode(record: StepRecord) -> bytes:
    return _encoder.encode(record)


def decode(message: bytes) -> StepRecord:
    """The record in `message`; raises ChannelError naming the requests it was for, where it can."""
    try:
        header = _header.decode(message)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ChannelError(f"an unreadable message from the steering worker ({len(message)} bytes: {e})", []) from e
    if header.version != VERSION:
        raise ChannelError(f"the steering worker sent channel version {header.version}; this front end reads "
                           f"version {VERSION}: the worker and the front end must come from one Rudder install; "
                           "retry the request", header.requests)
    try:
        return _decoder.decode(message)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ChannelError(f"a malformed step record from the steering worker ({e}); retry the request",
                           header.requests) from e
