"""The one channel from vLLM's workers to the front end: typed, versioned msgspec messages.

Each forward step that steered or read, the first worker sends one `StepRecord` over a local Unix
socket (msgpack, no pickle; each message after its 4-byte length): for every row of a steering or
reading request that produced a token (or a prompt readout), a `Row` with Rudder's own request id
(carried as data: the front end puts it in `SamplingParams.extra_args`, the worker reads it back), the
row's absolute position, its readouts, whether its steering overflowed, and a guard that fired there.
The worker writes to the socket itself, from the step (`Sender`): no I/O thread to hand the message
to and wake, as a zmq socket has; the front end reads it when a request needs a row (`Receiver.poll`),
so the write wakes nobody either.

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
import collections
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable

import msgspec

from rudder.core.errors import Unavailable
from rudder.server.backends.base import GuardHit, TokenReadout

log = logging.getLogger(__name__)

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

    SEND_BUFFER = 8 << 20  # asked for (the kernel caps it at net.core.wmem_max): a step's record fits whole

    def __init__(self, path: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SEND_BUFFER)
        self._sock.connect(path)

    def send(self, message: bytes) -> None:
        self._sock.sendall(_FRAME.pack(len(message)) + message)

    def close(self) -> None:
        self._sock.close()


class Receiver:
    """The front end's end: listens at `path`; each step's record is read when the front end needs it,
    so a worker's write wakes nobody.

    The worker writes a step's record before vLLM's output of that step leaves it, so when the front
    end takes a token from vLLM's output, that step's record is already in the socket: `poll` (called on
    the event loop `loop` by a request that awaits its row) reads whatever is there without blocking
    and hands each whole message to `handle`, in order. A reader blocked on the socket would be woken
    by every write: on two busy cores that wake-up preempted the worker mid-step (a median 0.1–0.2 ms
    stall a step, measured). A thread of its own still looks every POLL_S, and reads as the bytes come
    while a message is part-way (longer than the socket's buffer), so a worker never waits long on a
    full socket, nor on the event loop however busy: messages it reads wait for the loop in order.
    `ended` (a future on `loop`) settles when a connection ends: None where it closed between messages
    (the engine stopped), else the error."""

    MAX_MESSAGE = 1 << 30  # a longer length means the stream is out of step
    POLL_S = 0.05

    def __init__(self, path: str, handle: Callable[[bytes], None], loop: asyncio.AbstractEventLoop):
        self._handle, self._loop = handle, loop
        self.ended: asyncio.Future = loop.create_future()
        self._lock = threading.Lock()  # the loop's `poll` and the thread's read the same buffers
        self._conns: list[_Connection] = []
        self._ready: collections.deque[bytes] = collections.deque()  # whole messages read, not yet handled
        self._ends: list[Exception | None] = []  # connections that ended, not yet reported
        self._scheduled = False  # a `_hand_over` is on its way to the loop
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        threading.Thread(target=self._accept, name="rudder-readouts-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="rudder-readouts", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the front end is stopping
                return
            conn.setblocking(False)
            with self._lock:
                self._conns.append(_Connection(conn))

    def _read(self) -> bool:
        """Read what every connection has, without blocking, into whole messages; under the lock. True
        where a message is part-way."""
        partial = False
        for c in list(self._conns):
            try:
                c.read(self._ready, self.MAX_MESSAGE)
            except Exception as e:  # noqa: BLE001 - reported through `ended`
                self._conns.remove(c)
                c.sock.close()
                self._ends.append(None if isinstance(e, EOFError) else e)
                continue
            partial |= bool(c.buffer)
        return partial

    def poll(self) -> None:
        """On the event loop: hand every message the workers have sent so far to `handle`, in order."""
        with self._lock:
            self._read()
        self._hand_over()

    def _hand_over(self) -> None:
        while True:
            with self._lock:
                self._scheduled = False
                if not self._ready and not self._ends:
                    return
                ready, self._ready = self._ready, collections.deque()
                ends, self._ends = self._ends, []
            for message in ready:
                try:
                    self._handle(message)
                except Exception:  # one message's fault is not every other request's
                    log.exception("a steering worker message could not be handled")
            for error in ends:
                self._settle(error)

    def _settle(self, error: Exception | None) -> None:
        """`ended`, once: None where a connection closed between messages (or the receiver did), else why."""
        if not self.ended.done():
            self.ended.set_result(None) if error is None else self.ended.set_exception(error)

    def _watch(self) -> None:
        """Every POLL_S, or as the bytes come while a message is part-way: read, and have the loop hand
        over what was read (when no request polled first)."""
        partial = False
        while not self._closed.is_set():
            if partial:
                waiting = select.poll()
                with self._lock:
                    for c in self._conns:
                        waiting.register(c.sock, select.POLLIN)
                try:
                    waiting.poll(self.POLL_S * 1000)
                except OSError:  # a connection closed meanwhile: read it below
                    pass
            else:
                self._closed.wait(self.POLL_S)
            with self._lock:
                partial = self._read()
                wake = (self._ready or self._ends) and not self._scheduled
                self._scheduled |= bool(wake)
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._hand_over)
                except RuntimeError:  # the loop is closed: nobody is waiting
                    return

    def close(self) -> None:
        """On the event loop: stop reading; a request still waiting for a row hears at once (`ended`)."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            for c in self._conns:
                c.sock.close()
            self._conns.clear()
        self._settle(None)


class _Connection:
    """One worker's connection, non-blocking, and the bytes read of a message not yet whole."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, bytearray()
        self._chunk = memoryview(bytearray(1 << 16))  # reused: no large allocation per read

    def read(self, out: collections.deque[bytes], max_message: int) -> None:
        """Append every whole message now readable to `out`; EOFError where the worker closed between
        messages, ConnectionError where the stream broke."""
        while True:
            try:
                got = self.sock.recv_into(self._chunk)
            except BlockingIOError:
                got = None
            chunk = None if got is None else self._chunk[:got]
            if chunk:
                self.buffer += chunk
            while len(self.buffer) >= _FRAME.size:
                size = _FRAME.unpack_from(self.buffer)[0]
                if size > max_message:
                    raise ConnectionError(f"a message length the channel cannot have ({bytes(self.buffer[:4]).hex()})")
                if len(self.buffer) < _FRAME.size + size:
                    break
                out.append(bytes(self.buffer[_FRAME.size:_FRAME.size + size]))
                del self.buffer[:_FRAME.size + size]
            if chunk is None:
                return
            if not chunk:  # the worker closed its end
                if self.buffer:
                    raise ConnectionError(f"a message cut short ({len(self.buffer)} bytes of a frame)")
                raise EOFError
