"""Tensors and byte blobs on the wire: proto <-> torch conversion, chunking and reassembly.

A tensor travels as one ``TensorBegin`` (kind, layer, dtype, shape, nbytes, CRC-32) followed by
``Chunk`` messages of at most :data:`CHUNK_BYTES` raw little-endian bytes with contiguous offsets
from 0. bf16 travels as its raw 2-byte words (through a ``uint8`` view, never numpy dtypes).

Sending::

    for msg in iter_tensor_messages(pb.TENSOR_KIND_KEYS, layer, k):
        yield pb.CompressRequest(begin=msg) if isinstance(msg, pb.TensorBegin) else \
            pb.CompressRequest(chunk=msg)

Receiving::

    asm = TensorAssembler(begin, max_bytes=limit)   # validates before allocating
    while not asm.done:
        asm.add(next_chunk)                          # raises InvalidArgument on bad offsets
    tensor = asm.tensor()                            # CRC checked; shape/dtype from the begin

Blobs (stored containers for Fetch and Put) use :func:`iter_chunks` and :class:`BytesAssembler`.

The hot paths (Compress upload and answer, Fetch) skip protobuf for the chunk messages, which
carry almost every byte: :func:`tensor_frames` / :func:`blob_frames` serialise them straight from
the tensor or blob (one copy; protobuf makes four: ``bytes()``, the ``Chunk``, the wrapper and the
serialisation), and :func:`frame_parser` decodes them into :class:`ChunkFrame` views of the
received bytes (protobuf parses one copy and each ``data`` read makes another). The bytes on the
wire are exactly protobuf's; any message not in that exact form is parsed by protobuf.
All validation errors are :class:`kvpack.errors.InvalidArgument` (or ``ResourceExhausted`` for a
size over the caller's limit) with a message naming what was wrong.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from google.protobuf.message import Message
from isal.isal_zlib import crc32  # zlib's CRC-32 values, 13 vs 2.3 GB/s here

from kvpack.errors import DataLoss, InvalidArgument, ResourceExhausted
from kvpack.v1 import kvpack_pb2 as pb

#: Chunk size for tensor and blob bytes (1 MiB measured best on loopback: docs/PERFORMANCE.md,
#: "Message size of streamed chunks").
CHUNK_BYTES = 1 << 20

_TO_TORCH: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
}
_FROM_TORCH: dict[torch.dtype, int] = {v: k for k, v in _TO_TORCH.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("kvpack.wire assumes a little-endian host (raw tensor bytes are LE)")


def dtype_to_torch(dtype: int) -> torch.dtype:
    """torch dtype for a ``kvpack.v1.DType`` value; InvalidArgument for unspecified/unknown."""
    try:
        return _TO_TORCH[dtype]
    except KeyError:
        raise InvalidArgument(f"unsupported dtype {_dtype_name(dtype)}") from None


def dtype_from_torch(dtype: torch.dtype) -> int:
    """``kvpack.v1.DType`` value for a torch dtype (float32, float16, bfloat16, int64)."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot travel on the wire") from None


def _dtype_name(dtype: int) -> str:
    try:
        return pb.DType.Name(dtype)  # type: ignore[arg-type]
    except ValueError:
        return str(dtype)


def _kind_name(kind: int) -> str:
    try:
        return pb.TensorKind.Name(kind)  # type: ignore[arg-type]
    except ValueError:
        return str(kind)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of ``tensor`` (moved to CPU, made contiguous; no copy when it
    already is both). The view keeps the underlying storage alive."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def iter_chunks(
    data: bytes | bytearray | memoryview, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.Chunk]:
    """``Chunk`` messages covering ``data`` in order (one copy per chunk into the proto)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = memoryview(data).cast("B")
    for offset in range(0, len(view), chunk_bytes):
        yield pb.Chunk(offset=offset, data=bytes(view[offset : offset + chunk_bytes]))


def iter_tensor_messages(
    kind: int, layer: int, tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorBegin | pb.Chunk]:
    """A ``TensorBegin`` for ``tensor`` then its ``Chunk`` messages (none for an empty tensor).

    ``kind`` is a ``kvpack.v1.TensorKind``; ``layer`` is 0 for tensors that span all layers.
    """
    data = tensor_bytes(tensor)
    yield tensor_begin(kind, layer, tensor, data)
    yield from iter_chunks(data, chunk_bytes)


def tensor_begin(kind: int, layer: int, tensor: torch.Tensor, data: memoryview) -> pb.TensorBegin:
    """The ``TensorBegin`` announcing ``tensor``, whose bytes (:func:`tensor_bytes`) are
    ``data``."""
    return pb.TensorBegin(
        kind=kind,  # type: ignore[arg-type]
        layer=layer,
        dtype=dtype_from_torch(tensor.dtype),  # type: ignore[arg-type]
        shape=list(tensor.shape),
        nbytes=len(data),
        crc32=crc32(data),
    )


def serialize(message: Message | bytes) -> bytes:
    """gRPC serialiser for streams that mix protobuf messages and already serialised frames."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _chunk_tag(message_type: type[Message]) -> int:
    """First byte of a length-delimited ``chunk`` field (number < 16) of ``message_type``."""
    number = message_type.DESCRIPTOR.fields_by_name["chunk"].number
    assert number < 16
    return number << 3 | 2


def chunk_frame(tag: int, offset: int, data: memoryview, prefix: bytes = b"") -> bytes:
    """A serialised message: ``prefix`` (its lower-numbered fields, already serialised) then
    ``Chunk(offset, data)`` under the one-byte field tag ``tag``. Byte-identical to protobuf's
    serialisation (proto3 leaves out a zero offset and empty data), with one copy of ``data``."""
    inner = (b"\x08" + _varint(offset) if offset else b"") + (
        b"\x12" + _varint(len(data)) if len(data) else b""
    )
    return b"".join((prefix, bytes((tag,)), _varint(len(inner) + len(data)), inner, data))


def blob_frames(
    message_type: type[Message],
    data: bytes | bytearray | memoryview,
    prefix: bytes = b"",
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """Serialised ``message_type`` messages carrying ``data`` as in :func:`iter_chunks`, each
    starting with ``prefix`` (see :func:`chunk_frame`)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    tag = _chunk_tag(message_type)
    view = memoryview(data).cast("B")
    for offset in range(0, len(view), chunk_bytes):
        yield chunk_frame(tag, offset, view[offset : offset + chunk_bytes], prefix)


def tensor_frames(
    message_type: type[Message],
    kind: int,
    layer: int,
    tensor: torch.Tensor,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """:func:`iter_tensor_messages` wrapped in ``message_type`` (``CompressRequest`` or
    ``CompressResponse``) and serialised; the CRC-32 is computed once, from the tensor's own
    memory."""
    data = tensor_bytes(tensor)
    yield message_type(begin=tensor_begin(kind, layer, tensor, data)).SerializeToString()
    yield from blob_frames(message_type, data, chunk_bytes=chunk_bytes)


class ChunkView:
    """A received ``Chunk``: ``data`` is a view of the received message, not a copy."""

    __slots__ = ("data", "offset")

    def __init__(self, offset: int, data: memoryview) -> None:
        self.offset = offset
        self.data = data


class ChunkFrame:
    """A received message whose only field set is ``chunk`` (and ``total_bytes`` for a
    ``FetchResponse``), decoded by :func:`frame_parser`. Offers the part of the protobuf message
    API that the readers of these messages use."""

    __slots__ = ("_size", "chunk", "total_bytes")

    def __init__(self, chunk: ChunkView, total_bytes: int, size: int) -> None:
        self.chunk = chunk
        self.total_bytes = total_bytes
        self._size = size

    def WhichOneof(self, group: str) -> str:
        return "chunk"

    def HasField(self, name: str) -> bool:
        return name == "chunk"

    def ByteSize(self) -> int:
        return self._size


_UINT64 = (1 << 64) - 1


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); (-1, pos) when malformed, as protobuf would refuse it."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _UINT64, i + 1
        shift += 7
    return -1, pos


def _parse_frame(buf: bytes, tag: int, with_total: bool) -> ChunkFrame | None:
    """The frame in ``buf`` if it is exactly [total_bytes] chunk{[offset] data}, else None."""
    end = len(buf)
    pos = total = 0
    if with_total and end and buf[0] == 0x08:
        total, pos = _read_varint(buf, 1)
    if total < 0 or pos >= end or buf[pos] != tag:
        return None
    size, pos = _read_varint(buf, pos + 1)
    if pos + size != end or pos == end:
        return None
    offset = 0
    if buf[pos] == 0x08:
        offset, pos = _read_varint(buf, pos + 1)
    if offset < 0 or pos >= end or buf[pos] != 0x12:
        return None
    length, pos = _read_varint(buf, pos + 1)
    if length <= 0 or pos + length != end:
        return None
    return ChunkFrame(ChunkView(offset, memoryview(buf)[pos:]), total, end)


def frame_parser(message_type: type[Message]) -> Callable[[bytes], Any]:
    """gRPC deserialiser for ``message_type``: a :class:`ChunkFrame` for a chunk message in
    protobuf's own form, the parsed protobuf message for anything else (including malformed
    input, which protobuf rejects as before)."""
    tag = _chunk_tag(message_type)
    with_total = "total_bytes" in message_type.DESCRIPTOR.fields_by_name

    def parse(buf: bytes) -> Any:
        frame = _parse_frame(buf, tag, with_total)
        return message_type.FromString(buf) if frame is None else frame

    return parse


class BytesAssembler:
    """Collects ``Chunk`` messages into one buffer of exactly ``nbytes``.

    The buffer grows as bytes arrive (chunks are contiguous, so every write appends) rather than
    being allocated at the declared size: a header that announces gigabytes and then sends
    nothing costs nothing. Growing a large bytearray is a ``realloc`` that the allocator serves
    by remapping pages, not copying them, and no byte is zero-filled first.

    ``crc32`` (zlib) is checked at completion when given. ``what`` names the payload in errors
    (e.g. "KEYS layer 3"). ``nbytes`` must be ``<= max_bytes`` (ResourceExhausted otherwise).
    """

    def __init__(
        self, nbytes: int, *, max_bytes: int, crc32: int | None = None, what: str = "payload"
    ) -> None:
        if nbytes < 0:
            raise InvalidArgument(f"{what}: negative size {nbytes}")
        if nbytes > max_bytes:
            raise ResourceExhausted(
                f"{what}: {nbytes} bytes exceeds the limit of {max_bytes} bytes"
            )
        self.what = what
        self.nbytes = nbytes
        self.expected_crc = crc32
        self.buffer = bytearray()
        self.received = 0
        self._crc = 0

    @property
    def done(self) -> bool:
        """True once all ``nbytes`` have arrived."""
        return self.received == self.nbytes

    def add(self, chunk: pb.Chunk | ChunkView) -> bool:
        """Copies one chunk in; returns :attr:`done`. Offsets must continue exactly where the
        previous chunk ended and must not run past ``nbytes``."""
        start = self.received
        self.write(start, self.claim(chunk))
        return self.done

    def claim(self, chunk: pb.Chunk | ChunkView) -> bytes | memoryview:
        """Checks ``chunk`` as :meth:`add` does and counts it as received without copying it:
        returns its data, which the caller must :meth:`write` at the old :attr:`received`, in
        order and before :meth:`result`."""
        data = chunk.data  # each access of a protobuf bytes field copies: read once
        if chunk.offset != self.received:
            raise InvalidArgument(
                f"{self.what}: chunk offset {chunk.offset}, expected {self.received} "
                "(chunks must be contiguous and in order)"
            )
        end = self.received + len(data)
        if end > self.nbytes:
            raise InvalidArgument(
                f"{self.what}: chunk ends at byte {end}, past the declared {self.nbytes} bytes"
            )
        if not data:
            raise InvalidArgument(f"{self.what}: empty chunk at offset {chunk.offset}")
        self.received = end
        return data

    def write(self, start: int, data: bytes | memoryview) -> None:
        """Appends claimed ``data`` (which starts at byte ``start``) and extends the CRC. About
        1 ms per MiB, with the GIL released for most of it: run it off the event loop, one write
        at a time and in order."""
        if start != len(self.buffer):
            raise AssertionError(f"{self.what}: write at {start}, buffer holds {len(self.buffer)}")
        self.buffer += data
        if self.expected_crc is not None:
            self._crc = crc32(data, self._crc)

    def result(self) -> bytearray:
        """The completed buffer; InvalidArgument if incomplete, DataLoss on a CRC mismatch."""
        if not self.done:
            raise InvalidArgument(
                f"{self.what}: incomplete, got {self.received} of {self.nbytes} bytes"
            )
        if self.expected_crc is not None and self._crc != self.expected_crc:
            raise DataLoss(
                f"{self.what}: CRC-32 mismatch (got {self._crc:#010x}, "
                f"declared {self.expected_crc:#010x})"
            )
        return self.buffer


class TensorAssembler:
    """Reassembles one tensor from its ``TensorBegin`` and following ``Chunk`` messages.

    Validates on construction, before allocating: known dtype, non-negative shape,
    ``nbytes == prod(shape) * itemsize`` and ``nbytes <= max_bytes``.
    """

    def __init__(self, begin: pb.TensorBegin, *, max_bytes: int) -> None:
        self.kind = begin.kind
        self.layer = begin.layer
        what = f"{_kind_name(begin.kind)} tensor (layer {begin.layer})"
        self.dtype = dtype_to_torch(begin.dtype)
        self.shape = tuple(int(s) for s in begin.shape)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        expected = math.prod(self.shape) * itemsize
        if begin.nbytes != expected:
            raise InvalidArgument(
                f"{what}: nbytes {begin.nbytes} != prod(shape {list(self.shape)}) * "
                f"{itemsize} = {expected}"
            )
        self._bytes = BytesAssembler(
            begin.nbytes, max_bytes=max_bytes, crc32=begin.crc32, what=what
        )

    @property
    def what(self) -> str:
        """Human name of the tensor being assembled, for error messages."""
        return self._bytes.what

    @property
    def nbytes(self) -> int:
        return self._bytes.nbytes

    @property
    def done(self) -> bool:
        return self._bytes.done

    @property
    def received(self) -> int:
        return self._bytes.received

    def add(self, chunk: pb.Chunk | ChunkView) -> bool:
        """Copies one chunk in; returns True when the tensor is complete."""
        return self._bytes.add(chunk)

    def claim(self, chunk: pb.Chunk | ChunkView) -> bytes | memoryview:
        """See :meth:`BytesAssembler.claim`."""
        return self._bytes.claim(chunk)

    def write(self, start: int, data: bytes | memoryview) -> None:
        """See :meth:`BytesAssembler.write`."""
        self._bytes.write(start, data)

    def tensor(self) -> torch.Tensor:
        """The tensor (CPU, sharing the assembled buffer; no copy). CRC checked here."""
        buf = self._bytes.result()
        if not buf:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).reshape(self.shape)
