"""Container: round trips, header, slicing, layer-selective decode, append, and a fuzzed decoder
that must reject every truncation and bit flip with FormatError."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpack.codec import (
    CONTAINER_VERSION,
    FormatError,
    QuantSettings,
    append,
    assemble,
    decode,
    encode,
    encode_layer,
    read_header,
    slice_layers,
    verify,
)
from tests.codec.test_quant import check_bound

GOLDEN = Path(__file__).parent / "golden"
SMALL = QuantSettings(block_tokens=16, k_window=8, v_window=20)


def ragged_cache(
    seed: int = 0, dtype: torch.dtype = torch.float16, lengths: tuple[int, ...] = (70, 33, 50)
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ks = [torch.randn(1, 2, n, 8, generator=gen).to(dtype) for n in lengths]
    vs = [torch.randn(1, 2, n, 6, generator=gen).to(dtype) for n in lengths]
    idx = [
        torch.sort(torch.randperm(200, generator=gen)[:n]).values.expand(1, 2, n) for n in lengths
    ]
    idx = [i.contiguous() for i in idx]
    idx[1][0, 1, -3:] = -1  # padded slots are stored as given
    return ks, vs, idx


@pytest.fixture(scope="module")
def small_blob() -> bytes:
    ks, vs, idx = ragged_cache(lengths=(40, 25))
    return encode(ks, vs, indices=idx, settings=SMALL, meta={"model": "t"}, seq_len=200)


@pytest.mark.parametrize("mode", ["lossy", "fixed", "lossless"])
def test_round_trip_and_header(mode: str) -> None:
    ks, vs, idx = ragged_cache()
    s = QuantSettings(mode=mode, block_tokens=16, k_window=8, v_window=20)
    blob = encode(ks, vs, indices=idx, settings=s, meta={"policy": "kvcompose"}, seq_len=200)
    header = verify(blob)
    assert (
        header.version == CONTAINER_VERSION == 2
        and header.num_layers == 3
        and header.layers == [0, 1, 2]
    )
    assert header.dtype == "fp16" and header.settings == s and header.seq_len == 200
    assert header.meta == {"policy": "kvcompose"}
    assert header.k_shapes == [tuple(k.shape) for k in ks]
    assert header.raw_bytes[0] == (ks[0].numel() + vs[0].numel()) * 2
    assert sum(header.stored_bytes) < len(blob)
    # v2 quantises the tokens before the window that do not fill a block as one short block.
    whole, rest = divmod(70 - 8, 16)
    short = [rest] if mode != "lossless" else []
    assert header.entries[0].block_tokens("k") == [16] * whole + short
    assert len(header.coders[0]["k"]) == whole + len(short)
    out = decode(blob)
    for a, b in zip(idx, out.indices, strict=True):
        assert b is not None and torch.equal(a, b)
    for a, b in zip(ks + vs, out.keys + out.values, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if mode == "lossless":
            assert torch.equal(a, b)
        else:
            assert float((a.float() - b.float()).abs().max()) < 0.5


def test_encode_equals_encode_layer_plus_assemble() -> None:
    ks, vs, _ = ragged_cache(dtype=torch.bfloat16)
    layers = [encode_layer(k, v, None, SMALL) for k, v in zip(ks, vs, strict=True)]
    blob = assemble(layers, SMALL, dtype=torch.bfloat16, seq_len=7)
    assert blob == encode(ks, vs, settings=SMALL, seq_len=7)
    assert decode(blob).indices == [None, None, None]


def test_slice_and_layer_selective_decode() -> None:
    ks, vs, idx = ragged_cache()
    blob = encode(ks, vs, indices=idx, settings=SMALL)
    full = decode(blob)
    part = slice_layers(blob, 1, 3)
    header = verify(part)
    assert header.layers == [1, 2] and len(part) < len(blob)
    one = decode(part, [2])
    assert one.layers == [2] and torch.equal(one.keys[0], full.keys[2])
    assert torch.equal(decode(blob, [1]).values[0], full.values[1])
    # damage to layer 0 does not stop layer 1 from decoding alone, but does stop layer 0
    h = read_header(blob)
    bad = bytearray(blob)
    bad[h.data_offset + h.entries[0].k_window.offset] ^= 0x10
    assert torch.equal(decode(bytes(bad), [1]).keys[0], full.keys[1])
    with pytest.raises(FormatError, match="layer 0 K window"):
        decode(bytes(bad), [0])
    with pytest.raises(KeyError):
        decode(blob, [7])


def block_bytes(blob: bytes) -> list[bytes]:
    h = read_header(blob)
    out = []
    for e in h.entries:
        for ref in (*e.k_blocks, *e.v_blocks):
            start = h.data_offset + ref.offset
            out.append(blob[start : start + ref.length])
    return out


@pytest.mark.parametrize("mode", ["lossy", "lossless"])
def test_append_encodes_only_new_blocks(mode: str) -> None:
    s = QuantSettings(mode=mode, block_tokens=16, k_window=8, v_window=20)
    ks, vs, idx = ragged_cache()
    blob = encode(ks, vs, indices=idx, settings=s, seq_len=200)
    before = decode(blob)
    gen = torch.Generator().manual_seed(9)
    new_k = [torch.randn(1, 2, 40, 8, generator=gen).half() for _ in ks]
    new_v = [torch.randn(1, 2, 40, 6, generator=gen).half() for _ in ks]
    grown = append(blob, new_k, new_v)
    h = verify(grown)
    assert h.seq_len == 240 and h.k_shapes[0][2] == 110
    old_blocks = block_bytes(blob)
    new_blocks = block_bytes(grown)
    assert all(b in new_blocks for b in old_blocks)
    old_h, new_h = read_header(blob), h
    for oe, ne in zip(old_h.entries, new_h.entries, strict=True):
        assert [r.crc for r in ne.k_blocks[: len(oe.k_blocks)]] == [r.crc for r in oe.k_blocks]
        assert len(ne.k_blocks) > len(oe.k_blocks)
    after = decode(grown)
    for i in range(3):
        enc = sum(old_h.entries[i].block_tokens("k"))  # incl. a short last block (v2)
        assert torch.equal(after.keys[i][:, :, :enc], before.keys[i][:, :, :enc])
        assert torch.equal(after.keys[i][:, :, -8:], new_k[i][:, :, -8:])  # window stays exact
        ai = after.indices[i]
        assert ai is not None and ai[0, 0, -40:].tolist() == list(range(200, 240))


def test_truncation_at_every_length_is_rejected(small_blob: bytes) -> None:
    for n in range(len(small_blob)):
        with pytest.raises(FormatError):
            verify(small_blob[:n])
        with pytest.raises(FormatError):
            decode(small_blob[:n])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_random_bit_flips_are_rejected(small_blob: bytes, data: st.DataObject) -> None:
    flips = data.draw(
        st.lists(st.integers(0, 8 * len(small_blob) - 1), min_size=1, max_size=3, unique=True)
    )
    bad = bytearray(small_blob)
    for bit in flips:
        bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError):
        verify(bytes(bad))
    with pytest.raises(FormatError):
        decode(bytes(bad))


def rewrite_header(blob: bytes, edit: dict[str, object]) -> bytes:
    """A copy of blob whose JSON header has `edit` applied, with a correct header crc32 (so the
    content checks, not the checksum, must catch the problem)."""
    magic, version, flags, n, _ = struct.unpack_from("<4sHHII", blob)
    doc = json.loads(blob[16 : 16 + n])
    doc.update(edit)
    head = json.dumps(doc).encode()
    return (
        struct.pack("<4sHHII", magic, version, flags, len(head), zlib.crc32(head))
        + head
        + blob[16 + n :]
    )


def test_bogus_fields_are_rejected(small_blob: bytes) -> None:
    doc = json.loads(small_blob[16 : 16 + struct.unpack_from("<I", small_blob, 8)[0]])
    layer = doc["layers"][0]
    cases: list[tuple[dict[str, object], str]] = [
        ({"data_bytes": doc["data_bytes"] + 1}, "data"),
        ({"dtype": "fp8"}, "dtype"),
        ({"settings": {**doc["settings"], "mode": "zip"}}, "mode"),
        ({"layers": [{**layer, "k_shape": [1, 2, 10**9, 8]}]}, "k_shape"),
        ({"layers": [{**layer, "k_shape": [1, 2, 2**24, 2**16]}]}, "k_shape"),
        (
            {"layers": [{**layer, "k_blocks": {**layer["k_blocks"], "coders": "h"}}]},
            "k_blocks",
        ),
        ({"layers": [{**layer, "k_blocks": {**layer["k_blocks"], "crcs": [-1]}}]}, "crcs"),
        ({"layers": [{**layer, "k_blocks": {**layer["k_blocks"], "coders": "zx"}}]}, "coders"),
        ({"layers": [{**layer, "k_blocks": {**layer["k_blocks"], "short": [[0, 0]]}}]}, "short"),
        ({"layers": [{**layer, "k_codebook": [1] * 21}]}, "codebook"),
        ({"layers": [{**layer, "v_window": [2**40, 0, "lossless"]}]}, "data bytes"),
        ({"layers": [{**layer, "v_window": [0, 0, "lossless", 5]}]}, "V window"),
        ({"layers": []}, "layers"),
        ({"seq_len": -1}, "seq_len"),
    ]
    for edit, match in cases:
        with pytest.raises(FormatError, match=match):
            verify(rewrite_header(small_blob, edit))
    wrong = bytearray(small_blob)
    wrong[4] = 3
    with pytest.raises(FormatError, match="version 3"):
        read_header(bytes(wrong))
    with pytest.raises(FormatError, match="magic"):
        read_header(b"PK\x03\x04" + small_blob[4:])
    with pytest.raises(FormatError):
        read_header(small_blob[:16] + b"{" * 10_000)


def test_encode_rejects_bad_input() -> None:
    k = torch.zeros(1, 2, 10, 4)
    with pytest.raises(ValueError):
        encode([k], [k.half()])
    with pytest.raises(ValueError):
        encode([k], [k], meta={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        encode([k], [k], indices=[torch.zeros(1, 2, 9, dtype=torch.int64)])


def test_per_layer_settings_are_recorded_and_decoded() -> None:
    ks, vs, idx = ragged_cache(dtype=torch.float32)
    base = QuantSettings(block_tokens=16)
    own = [
        base,
        QuantSettings(block_tokens=16, k_error_bound=0.2, v_error_bound=0.4),
        QuantSettings(block_tokens=8, k_error_bound=0.013, k_grouping="block", k_window=5),
    ]
    blob = encode(ks, vs, indices=idx, settings=base, layer_settings=own, seq_len=200)
    header = verify(blob)
    assert header.settings == base and header.layer_settings == own
    layers = json.loads(blob[16 : 16 + struct.unpack_from("<I", blob, 8)[0]])["layers"]
    assert "settings" not in layers[0]  # only layers that differ record their fields
    assert layers[1]["settings"] == {"k_error_bound": "0.2", "v_error_bound": "0.4"}
    out = decode(blob)
    for i, s in enumerate(own):
        check_bound(ks[i], out.keys[i], "k", s)
        check_bound(vs[i], out.values[i], "v", s)
    assert read_header(slice_layers(blob, 1, 3)).layer_settings == own[1:]
    grown = append(blob, [k[:, :, :20] for k in ks], [v[:, :, :20] for v in vs])
    assert verify(grown).layer_settings == own
    blocked = (50 - 5) // 8 * 8  # layer 2's K tokens in blocks, kept byte for byte
    assert torch.equal(decode(grown).keys[2][:, :, :blocked], out.keys[2][:, :, :blocked])
    with pytest.raises(ValueError, match="layer_settings"):
        encode(ks, vs, layer_settings=own[:2])


def test_v1_containers_decode_and_append_as_v1() -> None:
    blob = (GOLDEN / "lossy_fp16_channel.kvpk").read_bytes()
    header = verify(blob)
    assert header.version == 1 and all(e.k_meta is None for e in header.entries)
    before = decode(blob)
    gen = torch.Generator().manual_seed(3)
    new_k = [torch.randn(1, 2, 30, 8, generator=gen).half() for _ in range(2)]
    new_v = [torch.randn(1, 2, 30, 4, generator=gen).half() for _ in range(2)]
    grown = append(blob, new_k, new_v)
    assert verify(grown).version == 1
    after = decode(grown)
    blocked = len(header.entries[0].k_blocks) * 16
    assert torch.equal(after.keys[0][:, :, :blocked], before.keys[0][:, :, :blocked])
    assert torch.equal(after.keys[0][:, :, -8:], new_k[0][:, :, -8:])


def with_section(
    blob: bytes, layer: int, name: str, data: bytes, coder: str | None = None
) -> bytes:
    """v2 blob with section `name` of layer `layer` replaced by `data` (its length, crc32 and
    optionally coder rewritten in the header, so that only the content checks can catch it)."""
    h = read_header(blob)
    head_len = struct.unpack_from("<I", blob, 8)[0]
    doc = json.loads(blob[16 : 16 + head_len])
    parts = []
    for e, raw in zip(h.entries, doc["layers"], strict=True):
        keys = {"indices": "indices", "K metadata": "k_meta", "V metadata": "v_meta"}
        keys |= {"K window": "k_window", "V window": "v_window"}
        for sec_name, ref in e.named_sections():
            start = h.data_offset + ref.offset
            body = blob[start : start + ref.length]
            if e.layer == layer and sec_name == name:
                body = data
                if sec_name in keys:
                    raw[keys[sec_name]] = [len(data), zlib.crc32(data), coder or ref.coder]
                else:
                    kind, _, i = sec_name.split()
                    table = raw[f"{kind.lower()}_blocks"]
                    table["lengths"][int(i)] = len(data)
                    table["crcs"][int(i)] = zlib.crc32(data)
            parts.append(body)
    doc["data_bytes"] = sum(len(p) for p in parts)
    head = json.dumps(doc).encode()
    prefix = struct.pack("<4sHHII", b"KVPK", h.version, 0, len(head), zlib.crc32(head))
    return prefix + head + b"".join(parts)


@pytest.mark.parametrize("mode", ["lossy", "fixed"])
def test_damaged_group_metadata_is_rejected(mode: str) -> None:
    ks, vs, _ = ragged_cache(dtype=torch.float32, lengths=(40, 25))
    s = QuantSettings(mode=mode, block_tokens=16)
    blob = encode(ks, vs, settings=s)
    meta = read_header(blob).entries[0].k_meta
    assert meta is not None and meta.coder == ("meta-zstd" if mode == "lossy" else "meta-raw")
    assert decode(with_section(blob, 0, "K block 0", block_bytes(blob)[0])).layers == [0, 1]
    # K channel groups: B * H * d = 16 per block, 3 blocks (2 of 16 tokens, 1 of 8)
    assert read_header(blob).entries[0].block_tokens("k") == [16, 16, 8]
    n = 3 * 16
    bad_code = bytes(4 * n)  # step codes 0: out of range
    escaped = np.full(n, 0xFFFF, dtype="<u2").view(np.uint8).reshape(-1, 2).T.tobytes()
    escaped += bytes(2 * n)  # anchor codes, then no fp32 values at all
    cases = [
        (bad_code, "meta-raw", "step code"),
        (bad_code[:-1], "meta-raw", "cannot hold"),
        (escaped, "meta-raw", "escapes need"),
        (zstandard.ZstdCompressor().compress(bad_code), "meta-zstd", "step code"),
        (zstandard.ZstdCompressor().compress(bytes(10**6)), "meta-zstd", "declares"),
        (bad_code, "meta-zstd", "zstd"),
        (bad_code, "zip", "coder"),
    ]
    for data, coder, match in cases:
        bad = with_section(blob, 0, "K metadata", data, coder)
        with pytest.raises(FormatError, match=match):
            verify(bad)
        with pytest.raises(FormatError, match=match):
            decode(bad)
    fp = np.array([np.inf, 1.0], dtype="<f4").repeat(n)  # non-finite escaped minima
    bad = with_section(blob, 0, "K metadata", escaped + fp.tobytes(), "meta-raw")
    with pytest.raises(FormatError, match="non-finite"):
        decode(bad)


def test_v2_header_metadata_fields_are_checked(small_blob: bytes) -> None:
    doc = json.loads(small_blob[16 : 16 + struct.unpack_from("<I", small_blob, 8)[0]])
    layer = doc["layers"][0]
    no_meta = {k: v for k, v in layer.items() if k != "k_meta"}
    cases: list[tuple[dict[str, object], str]] = [
        ({"layers": [{**layer, "k_meta": None}]}, "needs k_meta"),
        ({"layers": [no_meta]}, "fields"),
        ({"layers": [{**layer, "settings": {"k_error_bound": "2"}}]}, "k_error_bound"),
        (
            {"layers": [{**layer, "settings": {"mode": "lossless"}, "k_codebook": None}]},
            "cannot have k_meta|codebook",
        ),
        ({"layers": [{**layer, "settings": {}}]}, "settings"),
    ]
    for edit, match in cases:
        with pytest.raises(FormatError, match=match):
            verify(rewrite_header(small_blob, edit))


@pytest.mark.parametrize("grouping", ["channel", "block"])
def test_short_last_block_and_append_after_it(grouping: str) -> None:
    """v2 quantises the tokens that do not fill a block as one short block (the window holds
    exactly its setting); append keeps it in place and adds whole blocks after it."""
    ks, vs, _ = ragged_cache(dtype=torch.float32, lengths=(45, 7))
    s = QuantSettings(block_tokens=16, k_grouping=grouping, v_window=3)
    blob = encode(ks, vs, settings=s)
    h = verify(blob)
    assert [e.block_tokens("k") for e in h.entries] == [[16, 16, 13], [7]]
    assert [e.block_tokens("v") for e in h.entries] == [[16, 16, 10], [4]]
    out = decode(blob)
    for i in range(2):
        check_bound(ks[i], out.keys[i], "k", s)
        check_bound(vs[i], out.values[i], "v", s)
    gen = torch.Generator().manual_seed(4)
    new_k = [torch.randn(1, 2, 20, 8, generator=gen) for _ in range(2)]
    new_v = [torch.randn(1, 2, 20, 6, generator=gen) for _ in range(2)]
    grown = append(blob, new_k, new_v)
    g = verify(grown)
    assert [e.block_tokens("k") for e in g.entries] == [[16, 16, 13, 16], [7, 16]]
    assert [e.block_tokens("v") for e in g.entries] == [[16, 16, 10, 16], [4, 16]]
    after = decode(grown)
    for i, n in enumerate((45, 7)):
        assert torch.equal(after.keys[i][:, :, :n], out.keys[i])  # old blocks unchanged
        assert torch.equal(after.values[i][:, :, : n - 3], out.values[i][:, :, : n - 3])
        assert torch.equal(after.keys[i][:, :, n + 16 :], new_k[i][:, :, 16:])  # window exact
    full_k = [torch.cat([k, nk], dim=2) for k, nk in zip(ks, new_k, strict=True)]
    err = (after.keys[0][:, :, 45:61].float() - full_k[0][:, :, 45:61].float()).abs().max()
    assert float(err) < 0.5
    doc = json.loads(blob[16 : 16 + struct.unpack_from("<I", blob, 8)[0]])
    layer = doc["layers"][0]
    table = layer["k_blocks"]
    assert table["short"] == [[2, 13]]
    for blocks, match in (
        ({**table, "short": [[2, 16]]}, "tokens"),
        ({**table, "short": [[2, 14]]}, "hold 46 tokens"),
        ({**table, "short": [[0, 1], [1, 1], [2, 13]]}, "hold 15 tokens"),
        ({**table, "short": [[2, 13], [1, 13]]}, "short block"),
    ):
        with pytest.raises(FormatError, match=match):
            verify(
                rewrite_header(blob, {"layers": [{**layer, "k_blocks": blocks}, doc["layers"][1]]})
            )
    # A short block is only made where it cannot take more bytes than its tokens in full
    # precision: 2 fp16 tokens of K channel groups (8 bytes of metadata per channel) are not.
    tiny = encode([ks[0][:, :, :34].half()], [vs[0][:, :, :34].half()], settings=s)
    assert read_header(tiny).entries[0].block_tokens("k") == [16, 16]
    # A valid table that moves the short block: its symbols no longer decode.
    moved = {**table, "short": [[1, 13]]}
    with pytest.raises(FormatError, match="block 1"):
        decode(rewrite_header(blob, {"layers": [{**layer, "k_blocks": moved}, doc["layers"][1]]}))


@pytest.mark.parametrize("mode", ["lossy", "fixed"])
def test_metadata_never_exceeds_eight_bytes_per_group(mode: str) -> None:
    """Where escapes make the codes larger (bounds below 1/80: every group is an escape), the
    metadata falls back to fp32 anchors and steps: 8 bytes per group, as in v1."""
    ks, vs, _ = ragged_cache(dtype=torch.float32, lengths=(64, 16))
    s = QuantSettings(mode=mode, block_tokens=16, k_error_bound=0.001, v_error_bound=0.001)
    blob = encode(ks, vs, settings=s)
    e = verify(blob).entries[0]
    assert e.k_meta is not None and e.v_meta is not None
    assert e.k_meta.length <= 8 * 4 * 16 and e.v_meta.length <= 8 * 4 * 32  # blocks x groups
    assert {e.k_meta.coder, e.v_meta.coder} == {"meta-fp32"}
    out = decode(blob)
    check_bound(ks[0], out.keys[0], "k", s)
    check_bound(vs[0], out.values[0], "v", s)
