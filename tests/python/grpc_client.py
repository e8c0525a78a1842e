# Named grpc_client, not grpc_reflection: a script of that name would shadow the package.
"""The gRPC API as an outside Python client sees it: `grpcio-reflection`'s v1alpha client lists
the services, and a client built from reflection alone (a descriptor pool filled over
reflection, message classes made from it, no generated stubs) streams tokens with stop strings,
log-probabilities and usage. `--part limits` (a cluster with slowed steps): a cancelled stream
and a missed deadline (DEADLINE_EXCEEDED) free their sequence at once."""
import argparse
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from common import active_requests, run, wait_active

p = argparse.ArgumentParser()
p.add_argument("--grpc", required=True)
p.add_argument("--switchyard", required=True)
p.add_argument("--part", choices=["basic", "limits"], required=True)
a = p.parse_args()

channel = grpc.insecure_channel(a.grpc)
pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
method = pool.FindServiceByName("switchyard.v1.Inference").FindMethodByName("Generate")
Request = message_factory.GetMessageClass(method.input_type)
Response = message_factory.GetMessageClass(method.output_type)
generate = channel.unary_stream("/switchyard.v1.Inference/Generate",
                                request_serializer=Request.SerializeToString,
                                response_deserializer=Response.FromString)


def v1alpha_lists_the_inference_service():
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert "switchyard.v1.Inference" in names and "grpc.health.v1.Health" in names, names


def a_client_from_reflection_streams_tokens():
    msgs = list(generate(Request(text="hello", max_tokens=8, logprobs=True, top_logprobs=2), timeout=60))
    assert len(msgs) == 8 and [m.index for m in msgs] == list(range(8)), msgs
    assert all(m.logprob <= 0 and len(m.top_logprobs) == 2 for m in msgs)
    last = msgs[-1]
    assert last.finish_reason == 2, last  # FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == 5 and last.usage.completion_tokens == 8, last.usage
    assert not msgs[0].HasField("usage")


def stop_strings_end_the_stream():
    full = "".join(m.text for m in generate(Request(text="stop me", max_tokens=40), timeout=60))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    msgs = list(generate(Request(text="stop me", max_tokens=40, stop=[stop]), timeout=60))
    assert "".join(m.text for m in msgs) == full[:full.find(stop)]
    assert msgs[-1].finish_reason == 1 and msgs[-1].usage.completion_tokens == len(msgs), msgs[-1]


def a_cancelled_stream_frees_its_sequence():
    call = generate(Request(text="long", max_tokens=400, ignore_eos=True), timeout=120)
    for i, _ in enumerate(call):
        if i == 3:
            break
    assert active_requests(a.switchyard, a.grpc) == 1
    call.cancel()
    took = wait_active(a.switchyard, a.grpc, 0, limit_s=3)
    print(f"     freed {took:.2f} s after the cancel")


def a_cancel_during_a_long_prefill_frees_it_before_its_first_token():
    # --max-batch-tokens 4 and 10 ms steps: a 500-token prompt is over a second of prefill.
    call = generate(Request(text="ab" * 250, max_tokens=4), timeout=60)
    time.sleep(0.3)
    assert active_requests(a.switchyard, a.grpc) == 1
    call.cancel()
    took = wait_active(a.switchyard, a.grpc, 0, limit_s=0.6)
    print(f"     freed {took:.2f} s after the cancel, mid-prefill")


def a_deadline_ends_the_request_and_frees_it():
    try:
        for _ in generate(Request(text="long", max_tokens=400, ignore_eos=True), timeout=1.0):
            pass
        raise AssertionError("the stream outlived its deadline")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    wait_active(a.switchyard, a.grpc, 0, limit_s=3)


if a.part == "basic":
    run([v1alpha_lists_the_inference_service, a_client_from_reflection_streams_tokens, stop_strings_end_the_stream])
else:
    run([a_cancelled_stream_frees_its_sequence, a_cancel_during_a_long_prefill_frees_it_before_its_first_token,
         a_deadline_ends_the_request_and_frees_it])
