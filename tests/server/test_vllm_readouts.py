"""The vLLM front end's channel from the workers (server.backends.channel), without an engine: typed
records route to their requests; a record the front end cannot read fails only the requests it
names, with UNAVAILABLE, and is logged; a row that never comes is an error after READOUT_WAIT_S; an
overflowed row ends its request."""

import asyncio
import logging

import msgspec
import pytest

from rudder.core.errors import InvalidArgument, ReadoutMissing, Unavailable
from rudder.server.backends import channel
from rudder.server.backends import vllm as vllm_front
from rudder.server.backends.base import GuardHit, TokenReadout


def bare_engine():
    engine = object.__new__(vllm_front.VllmEngine)  # only the routing state: no model, no vLLM
    engine._rows, engine.recomputed_rows, engine.on_hook_step, engine.bad_messages = {}, 0, None, 0
    return engine


def record(*rows: channel.Row, **kw) -> bytes:
    return channel.encode(channel.StepRecord(requests=sorted({r.request for r in rows}), hook_s=0.0, rows=list(rows),
                                             **kw))


def test_a_record_reaches_its_requests_by_the_id_it_carries():
    async def go():
        engine = bare_engine()
        a, b = (engine._rows.setdefault(k, vllm_front._Rows()) for k in "ab")
        engine._handle(record(channel.Row("a", 5, [TokenReadout("s", top_ids=[1], top_values=[2.5])]),
                              channel.Row("b", 7, []), channel.Row("gone", 1, [])))  # "gone" ended: skipped
        assert (await asyncio.wait_for(a.row(5), 1))[0] == [TokenReadout("s", top_ids=[1], top_values=[2.5])]
        assert await asyncio.wait_for(b.row(7), 1) == ([], None, False)
        assert engine.bad_messages == 0
    asyncio.run(go())


def test_a_malformed_and_an_unknown_version_record_fail_only_their_requests(caplog):
    async def go():
        engine = bare_engine()
        a, b, c = (engine._rows.setdefault(k, vllm_front._Rows()) for k in "abc")
        with caplog.at_level(logging.ERROR):
            engine._handle(b"\x93not msgpack at all")  # names nobody: logged and counted, nobody fails
            assert a.error is None and b.error is None and c.error is None
            # a readable header naming "a", rows of the wrong shape
            engine._handle(msgspec.msgpack.encode({"version": channel.VERSION, "requests": ["a"], "hook_s": 0.0,
                                                   "rows": [["a", "five", None]]}))
            engine._handle(record(channel.Row("b", 3, []), version=channel.VERSION + 1))  # a newer worker
            engine._handle(record(channel.Row("c", 4, [])))  # and a good one, for c
        assert engine.bad_messages == 3
        with pytest.raises(Unavailable, match="malformed"):
            await a.row(0)
        with pytest.raises(Unavailable, match=f"version {channel.VERSION + 1}.*version {channel.VERSION}"):
            await b.row(3)
        assert await asyncio.wait_for(c.row(4), 1) == ([], None, False)
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(logged) == 3 and "requests: unknown" in logged[0] and "requests: a" in logged[1]
    asyncio.run(go())


def test_an_unavailable_record_maps_to_the_unavailable_status():
    assert channel.ChannelError("x", ["a"]).code == "UNAVAILABLE"


def test_a_missing_row_is_an_error_and_an_overflowed_row_ends_the_request(monkeypatch, tiny_dir):
    from transformers import AutoTokenizer

    from rudder.server.backends.base import EngineRequest
    from rudder.server.backends.sequence import Sequence

    monkeypatch.setattr(vllm_front, "READOUT_WAIT_S", 0.05)

    async def go():
        engine = bare_engine()
        box = engine._rows["a"] = vllm_front._Rows()
        with pytest.raises(ReadoutMissing, match="position 3"):
            await box.row(3)
        engine._handle(record(channel.Row("a", 4, [], broken=True)))
        readouts, hit, broken = await box.row(4)
        assert broken and hit is None
        seq = Sequence(EngineRequest([1, 2, 3, 4, 5]), AutoTokenizer.from_pretrained(tiny_dir), frozenset())
        with pytest.raises(InvalidArgument, match="non-finite by token position 4"):
            seq.ends_at_row(readouts, hit, broken)  # the sequence's rule: an overflowed row ends the request
    asyncio.run(go())


def test_a_guard_hit_is_kept_by_the_position_it_fired_at_and_a_recomputed_row_keeps_the_first():
    async def go():
        engine = bare_engine()
        box = engine._rows["a"] = vllm_front._Rows()
        engine._handle(record(channel.Row("a", 6, [], hit=GuardHit(0, 6, 31.0)), channel.Row("a", 7, [])))
        engine._handle(record(channel.Row("a", 6, [TokenReadout("s", top_ids=[9])])))  # preempted, recomputed
        assert await box.row(6) == ([], GuardHit(0, 6, 31.0), False)
        assert engine.recomputed_rows == 1
    asyncio.run(go())


def test_no_pickle_on_the_channel():
    import rudder.server.backends.vllm as front
    import rudder.server.backends.vllm_worker as worker

    for module in (channel, front, worker):
        source = open(module.__file__).read()
        assert "import pickle" not in source and "pickle." not in source, module.__name__


def test_the_channel_carries_each_message_whole_in_order_and_never_waits_on_the_event_loop(tmp_path):
    """A real Unix socket: two workers' `Sender`s in threads (as in vLLM's workers: blocking writes from
    the step), the front end's `Receiver`. While the event loop is held (busy with something else), the
    workers still finish sending, messages larger than the socket's buffer among them; then every
    message arrives whole, each worker's in order. Workers closing their ends settle `ended` with None;
    a message cut short (one worker, so that no clean close settles it first) settles it with the error."""
    import threading

    sent = {w: [bytes([w * 10 + i]) * n for i, n in enumerate([0, 1, 5_000, 3_000_000, 17])] for w in (1, 2)}

    async def go(cut: bool):
        path = str(tmp_path / ("cut" if cut else "whole"))
        got = []
        receiver = channel.Receiver(path, got.append, asyncio.get_running_loop())

        def worker(w: int):
            sender = channel.Sender(path)
            for m in sent[w]:
                sender.send(m)
            if cut and w == 2:  # a length, then half the message
                sender._sock.sendall(channel._FRAME.pack(100) + b"x" * 50)
            sender.close()

        workers = (2,) if cut else (1, 2)
        threads = [threading.Thread(target=worker, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:  # the event loop is held here: the workers must not need it
            t.join(60)
            assert not t.is_alive()
        try:
            if cut:
                with pytest.raises(ConnectionError, match="cut short"):
                    await asyncio.wait_for(asyncio.shield(receiver.ended), 30)
            else:
                assert await asyncio.wait_for(asyncio.shield(receiver.ended), 30) is None
            async def all_handed_over():  # the other worker's messages may still be on their way to the loop
                while len(got) < 5 * len(workers):
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(all_handed_over(), 30)
        finally:
            receiver.close()
        for w in workers:
            assert [m for m in got if m and m[0] // 10 == w] == [m for m in sent[w] if m]
        assert got.count(b"") == len(workers) and len(got) == 5 * len(workers)

    asyncio.run(go(cut=False))
    asyncio.run(go(cut=True))


def test_a_request_that_awaits_its_row_reads_the_step_record_from_the_socket_itself(tmp_path, monkeypatch):
    """The worker's record of a step is in the socket before vLLM's output of it reaches the front end, so
    the request awaiting that row reads it there (`Receiver.poll`): no reader is woken by the worker's
    write. Here the receiver's own thread never looks (POLL_S an hour), and the rows still arrive, whole
    and in order, as soon as a request asks."""
    monkeypatch.setattr(channel.Receiver, "POLL_S", 3600.0)

    async def go():
        engine = bare_engine()
        receiver = channel.Receiver(str(tmp_path / "sock"), engine._handle, asyncio.get_running_loop())
        try:
            sender = channel.Sender(str(tmp_path / "sock"))
            while not receiver._conns:  # the accept thread has taken the connection (before any record, as at set-up)
                await asyncio.sleep(0.01)
            box = engine._rows["a"] = vllm_front._Rows(receiver.poll)
            sender.send(record(channel.Row("a", 5, [TokenReadout("s", top_ids=[1], top_values=[2.0])])))
            sender.send(record(channel.Row("a", 6, [], broken=True)))
            sender.send(record(channel.Row("a", 5, [TokenReadout("s", top_ids=[7], top_values=[9.0])])))  # recomputed
            assert box.by_position == {}  # nothing read yet: nobody reads until a request asks
            assert (await asyncio.wait_for(box.row(5), 5))[0] == [TokenReadout("s", top_ids=[1], top_values=[2.0])]
            assert box.by_position.keys() == {5, 6} and engine.recomputed_rows == 1  # in order: the first kept
            assert (await box.row(6))[2]
            sender.close()
            receiver.poll()  # the worker closed between messages: the channel ended cleanly
            assert receiver.ended.done() and receiver.ended.result() is None
        finally:
            receiver.close()

    asyncio.run(go())


def test_a_message_whose_handling_fails_costs_no_other_and_closing_the_channel_ends_it(tmp_path, monkeypatch, caplog):
    """One message that its handler fails on is logged; the messages read with it are still handled, in
    order. Closing the receiver (the engine stopping) settles `ended` at once, so a request still waiting
    for a row hears at once instead of after READOUT_WAIT_S."""
    monkeypatch.setattr(channel.Receiver, "POLL_S", 3600.0)

    async def go():
        got = []

        def handle(message: bytes) -> None:
            if message == b"bad":
                raise RuntimeError("a fault in the handler")
            got.append(message)

        receiver = channel.Receiver(str(tmp_path / "sock"), handle, asyncio.get_running_loop())
        sender = channel.Sender(str(tmp_path / "sock"))
        while not receiver._conns:
            await asyncio.sleep(0.01)
        for m in (b"one", b"bad", b"two"):
            sender.send(m)
        with caplog.at_level(logging.ERROR):
            receiver.poll()
        assert got == [b"one", b"two"]
        assert any("could not be handled" in r.getMessage() for r in caplog.records)
        assert not receiver.ended.done()
        receiver.close()
        assert receiver.ended.done() and receiver.ended.result() is None
        sender.close()

    asyncio.run(go())
