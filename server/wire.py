"""The generation core's events in the API's protobuf messages: the gRPC stream sends them as
they are, the OpenAI door writes their JSON mapping (so the two doors cannot drift)."""

from __future__ import annotations

from rudder.server.backends.base import TokenEvent, TokenReadout
from rudder.server.generation import Event
from rudder.v1 import steering_pb2 as pb

STOP_REASON = {"length": pb.LENGTH, "eos": pb.EOS, "stop": pb.STOP_STRING, "guard": pb.GUARD}


def readout_to_pb(r: TokenReadout) -> pb.Readout:
    msg = pb.Readout(source=r.source)
    if r.codes is not None:
        msg.codes.extend(pb.CodeGroup(head=h, codes=c) for h, c in enumerate(r.codes))
    else:
        msg.top.ids.extend(r.top_ids)
        msg.top.values.extend(r.top_values)
        msg.selected.ids.extend(r.selected_ids)
        msg.selected.values.extend(r.selected_values)
    return msg


def token_to_pb(ev: TokenEvent) -> pb.Token:
    return pb.Token(id=ev.token_id, text=ev.text, logprob=ev.logprob, position=ev.position, is_prompt=ev.is_prompt,
                    top_logprobs=[pb.TokenLogprob(id=a.id, text=a.text, logprob=a.logprob) for a in ev.top_logprobs])


def response_to_pb(event: Event) -> pb.GenerateResponse:
    ev = event.token
    msg = pb.GenerateResponse(token=token_to_pb(ev), baseline=event.baseline,
                              readouts=[readout_to_pb(r) for r in ev.readouts])
    if ev.guard is not None:
        msg.guard.CopyFrom(pb.GuardHit(index=ev.guard.index, position=ev.guard.position, value=ev.guard.value))
    if ev.finish:
        msg.stop_reason = STOP_REASON[ev.finish]
    if event.usage is not None:
        msg.usage.prompt_tokens = event.usage.prompt_tokens
        msg.usage.completion_tokens = event.usage.completion_tokens
    return msg
