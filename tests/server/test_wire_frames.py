"""kvpack.wire's hand-serialised chunk messages are protobuf's bytes, and its parser agrees with
protobuf on every input (falling back to protobuf for anything not in protobuf's own form)."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from kvpack import wire
from kvpack.v1 import kvpack_pb2 as pb


def _protobuf_frames(message_type: type, tensor: torch.Tensor, chunk_bytes: int) -> list[bytes]:
    return [
        message_type(
            **{"begin" if isinstance(m, pb.TensorBegin) else "chunk": m}
        ).SerializeToString()
        for m in wire.iter_tensor_messages(pb.TENSOR_KIND_VALUES, 7, tensor, chunk_bytes)
    ]


@pytest.mark.parametrize("numel", [0, 1, 63, 64, 100_000])
@pytest.mark.parametrize("message_type", [pb.CompressRequest, pb.CompressResponse])
def test_tensor_frames_are_protobufs_bytes(message_type: type, numel: int) -> None:
    t = torch.randn(numel).to(torch.bfloat16)
    frames = list(wire.tensor_frames(message_type, pb.TENSOR_KIND_VALUES, 7, t, chunk_bytes=4096))
    assert frames == _protobuf_frames(message_type, t, 4096)
    parse = wire.frame_parser(message_type)
    asm = wire.TensorAssembler(message_type.FromString(frames[0]).begin, max_bytes=1 << 30)
    for frame in frames[1:]:
        msg = parse(frame)
        assert isinstance(msg, wire.ChunkFrame) and msg.WhichOneof("msg") == "chunk"
        assert msg.ByteSize() == len(frame)
        asm.add(msg.chunk)
    assert torch.equal(asm.tensor(), t)


def test_fetch_frames_carry_total_bytes() -> None:
    blob = bytes(range(256)) * 40
    prefix = pb.FetchResponse(total_bytes=len(blob)).SerializeToString()
    frames = list(wire.blob_frames(pb.FetchResponse, blob, prefix, chunk_bytes=1000))
    assert frames == [
        pb.FetchResponse(total_bytes=len(blob), chunk=c).SerializeToString()
        for c in wire.iter_chunks(blob, 1000)
    ]
    parse = wire.frame_parser(pb.FetchResponse)
    for frame in frames:
        msg, ref = parse(frame), pb.FetchResponse.FromString(frame)
        assert isinstance(msg, wire.ChunkFrame) and msg.HasField("chunk")
        assert (msg.total_bytes, msg.chunk.offset) == (ref.total_bytes, ref.chunk.offset)
        assert bytes(msg.chunk.data) == ref.chunk.data


@pytest.mark.parametrize(
    "message",
    [
        pb.CompressRequest(finish=pb.Finish()),
        pb.CompressRequest(chunk=pb.Chunk(offset=5)),  # empty data: refused by the assembler
        pb.CompressRequest(),
        pb.CompressRequest(begin=pb.TensorBegin(nbytes=3)),
    ],
)
def test_other_messages_are_parsed_by_protobuf(message: pb.CompressRequest) -> None:
    parsed = wire.frame_parser(pb.CompressRequest)(message.SerializeToString())
    assert isinstance(parsed, pb.CompressRequest) and parsed == message


def test_non_canonical_chunks_fall_back_to_protobuf() -> None:
    parse = wire.frame_parser(pb.CompressRequest)
    frame = pb.CompressRequest(chunk=pb.Chunk(offset=300, data=b"abc")).SerializeToString()
    # An unknown field after the chunk: protobuf keeps it, so the fast path must not apply.
    assert isinstance(parse(frame + b"\x28\x01"), pb.CompressRequest)
    with pytest.raises(DecodeError):
        parse(frame[:-1])  # truncated
    with pytest.raises(DecodeError):
        parse(b"\x1a" + b"\xff" * 11)  # overlong varint
