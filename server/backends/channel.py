"""The one channel from vLLM's workers to the front end: typed, versioned msgspec messages.

Each forward step that steered or read, the first worker sends one `StepRecord` over a local Unix
socket (msgpack, no pickle; each message after its 4-byte length): for every row of a steering or
reading request that produced a token (or a prompt readout), a `Row` with Rudder's own request id
(carried as data: the front end puts it in `SamplingParams.extra_args`, the worker reads it back), the
row's absolute position, its readouts, whether its steering overflowed, and a guard that fired there.
The worker writes to the socket itself, from the step (`Sender`): no I/O thread to hand the message
to and wake, as a zmq socket has; the front end reads it on a thread of its own (`Receiver`).

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
import threading
from collections.abc import Callable

import msgspec

from rudder.core.errors import Unavailable
from rudder.server.backends.base import GuardHit, TokenReadout

VERSION = 2  # 2: TokenReadout as an array
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
    """The worker's end: a blocking Unix stream socket, connected to the front end's `Receiver`."""

    def __init__(self, path: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)

    def send(self, message: bytes) -> None:
        self._sock.sendall(_FRAME.pack(len(message)) + message)

    def close(self) -> None:
        self._sock.close()


class Receiver:
    """The front end's end: listens at `path` and reads each connected worker's messages whole on a
    thread of its own (blocking reads), handing each to `handle` on the event loop `loop`. So a worker
    never waits on the front end's event loop, however busy: only a front end that stopped reading
    altogether would fill the socket and hold the worker. `ended` (a future on `loop`) settles when a
    connection ends: None where it closed between messages (the engine stopped), else the error."""

    MAX_MESSAGE = 1 << 30  # a longer length means the stream is out of step

    def __init__(self, path: str, handle: Callable[[bytes], None], loop: asyncio.AbstractEventLoop):
        self._handle, self._loop = handle, loop
        self.ended: asyncio.Future = loop.create_future()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        threading.Thread(target=self._accept, name="rudder-readouts-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the front end is stopping
                return
            threading.Thread(target=self._read, args=(conn,), name="rudder-readouts", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        ended: Exception | None = None
        try:
            with conn, conn.makefile("rb") as stream:
                while head := stream.read(_FRAME.size):
                    size = _FRAME.unpack(head)[0] if len(head) == _FRAME.size else -1
                    if not 0 <= size <= self.MAX_MESSAGE:
                        raise ConnectionError(f"a message length the channel cannot have ({head.hex()})")
                    message = stream.read(size)
                    if len(message) != size:
                        raise ConnectionError(f"a message cut short ({len(message)} of {size} bytes)")
                    self._loop.call_soon_threadsafe(self._handle, message)
        except Exception as e:  # noqa: BLE001 - reported through `ended`
            ended = e
        try:
            self._loop.call_soon_threadsafe(self._end, ended)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    def _end(self, error: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None) if error is None else self.ended.set_exception(error)

    def close(self) -> None:
        self._listener.close()
