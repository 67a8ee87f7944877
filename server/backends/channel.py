"""The one channel from vLLM's workers to the front end: typed, versioned msgspec messages.

Each forward step that steered or read, the first worker sends one `StepRecord` over a local Unix
socket (msgpack, no pickle; each message after its 4-byte length): for every row of a steering or
reading request that produced a token (or a prompt readout), a `Row` with Rudder's own request id
(carried as data: the front end puts it in `SamplingParams.extra_args`, the worker reads it back), the
row's absolute position, its readouts, whether its steering overflowed, and a guard that fired there.
The worker writes to the socket itself, from the step (`Sender`): no I/O thread to hand the message
to and wake, as a zmq socket has; the front end reads it on its event loop (`receive`).

The contract, where readouts and tokens meet (`VllmEngine.generate`): the worker sends a step's
rows before vLLM's output of that step reaches the front end, so the front end awaits the row of
each token it streams, keyed by (request, position), for at most READOUT_WAIT_S. A row seen twice
(a request preempted and recomputed) keeps the first.

A message the front end cannot read is logged and counted; the requests its header names (when
that much can be read) fail with UNAVAILABLE, the others go on. A message of another version is
refused the same way, naming both versions.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

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


_FRAME = struct.Struct("<I")  # each message's length, before it


class Sender:
    """The worker's end: a blocking Unix stream socket, connected to the front end's `receive`."""

    def __init__(self, path: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)

    def send(self, message: bytes) -> None:
        self._sock.sendall(_FRAME.pack(len(message)) + message)

    def close(self) -> None:
        self._sock.close()


async def receive(server_path: str, handle: Callable[[bytes], None], started: asyncio.Future) -> None:
    """The front end's end: listen at `server_path` (setting `started` once it does), take the one worker
    that connects, and pass each of its messages to `handle`, until it closes the connection (the
    engine stopped) or the task is cancelled; a connection that breaks mid-message raises."""
    connected: asyncio.Future = asyncio.get_running_loop().create_future()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if connected.done():  # one sender (the first tensor-parallel rank): another is refused
            writer.close()
        else:
            connected.set_result((reader, writer))

    server = await asyncio.start_unix_server(accept, path=server_path)
    started.set_result(None)
    try:
        reader, writer = await connected
        try:
            while True:
                try:
                    head = await reader.readexactly(_FRAME.size)
                except asyncio.IncompleteReadError as e:
                    if not e.partial:  # closed between messages: the worker is gone
                        return
                    raise
                handle(await reader.readexactly(_FRAME.unpack(head)[0]))
        finally:
            writer.close()
    finally:
        server.close()
