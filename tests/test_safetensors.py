"""safetensors reader/writer: round trips of awkward shapes, interop with the safetensors
package, header validation naming file and tensor, atomic writes."""
import json
import struct

import numpy as np
import pytest

from qlora_ext.model.safetensors_io import SafetensorsFile, f32_to_bf16_bits, read_header, save_file

RNG = np.random.default_rng(7)
SHAPES = [(1,), (7,), (3, 5), (2, 3, 11), (0, 4), ()]


def bf16_to_f32(bits):
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


def tensors():
    return {f"t{i}": RNG.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    ts = tensors()
    p = tmp_path / "a.safetensors"
    save_file(ts, p, metadata={"format": "pt"}, dtype=dtype)
    h = read_header(p)
    assert h["metadata"] == {"format": "pt"} and h["data_start"] % 8 == 0
    with SafetensorsFile(p) as f:
        assert f.keys() == list(ts)
        for k, x in ts.items():
            if dtype is None:
                want = x
            elif dtype == "float16":
                want = x.astype(np.float16).astype(np.float32)
            else:
                want = bf16_to_f32(f32_to_bf16_bits(x)).reshape(x.shape)
            got = f.get(k)
            assert got.dtype == np.float32 and got.shape == x.shape
            np.testing.assert_array_equal(got, want)
            out = np.empty(x.shape, np.float32)
            assert f.get(k, out=out) is out
            f.release(k)


def test_bf16_rounding_matches_float64_reference():
    x = np.concatenate([RNG.standard_normal(1000).astype(np.float32),
                        np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 3.0e38, 1e-40], np.float32)])
    got = bf16_to_f32(f32_to_bf16_bits(x))
    # nearest of the two bf16 neighbours, ties to even mantissa
    lo = bf16_to_f32(x.view(np.uint32) >> 16)
    hi = bf16_to_f32((x.view(np.uint32) >> 16) + 1)
    finite = np.isfinite(x) & np.isfinite(hi)
    with np.errstate(invalid="ignore", over="ignore"):
        dl, dh = np.abs(x.astype(np.float64) - lo), np.abs(hi.astype(np.float64) - x)
    want = np.where(dl < dh, lo, np.where(dh < dl, hi, np.where((x.view(np.uint32) >> 16) % 2 == 0, lo, hi)))
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(bf16_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_uint16_needs_bfloat16(tmp_path):
    bits = f32_to_bf16_bits(RNG.standard_normal(9).astype(np.float32))
    with pytest.raises(ValueError, match="uint16"):
        save_file({"w": bits}, tmp_path / "x.safetensors")
    save_file({"w": bits}, tmp_path / "x.safetensors", dtype="bfloat16")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        np.testing.assert_array_equal(f.get_raw("w"), bits)
        assert f.info("w")["dtype"] == "BF16"


def test_interop_with_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    ts = {"a": RNG.standard_normal((3, 7)).astype(np.float32), "b": RNG.standard_normal(5).astype(np.float16)}
    st.save_file(ts, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert f.metadata == {"k": "v"}
        np.testing.assert_array_equal(f.get("a"), ts["a"])
        np.testing.assert_array_equal(f.get("b"), ts["b"].astype(np.float32))
    save_file(ts, tmp_path / "ours.safetensors", metadata={"k": "v"})
    back = st.load_file(str(tmp_path / "ours.safetensors"))
    np.testing.assert_array_equal(back["a"], ts["a"])
    np.testing.assert_array_equal(back["b"], ts["b"])


def test_bf16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    x = torch.randn(13, 17, dtype=torch.float32)
    st.save_file({"w": x.to(torch.bfloat16)}, str(tmp_path / "t.safetensors"))
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        np.testing.assert_array_equal(f.get("w"), x.to(torch.bfloat16).float().numpy())
    # and our f32 -> bf16 rounding equals torch's
    np.testing.assert_array_equal(f32_to_bf16_bits(x.numpy()),
                                  x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def write_raw(path, header: dict, data: bytes, pad=True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16), "dtype 'I64' is not supported"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, bytes(16), "16 bytes of data but shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "out of bounds"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), "data_offsets must be"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ([1, 2], b"", "must be a JSON object"),
])
def test_bad_headers(tmp_path, header, data, message):
    p = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=message) as e:
        read_header(p)
    assert "bad.safetensors" in str(e.value)
    if isinstance(header, dict) and len(header) == 1:
        assert "'w'" in str(e.value)


def test_truncated_and_garbage(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="runs past the end"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 4) + b"{x]}")
    with pytest.raises(ValueError, match="header: not valid JSON"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2**40))
    with pytest.raises(ValueError, match="exceeds"):
        read_header(p)
    with pytest.raises(OSError, match="not found"):
        read_header(tmp_path / "missing.safetensors")


def test_save_is_atomic(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"w": np.ones(3, np.float32)}, p)
    before = p.read_bytes()
    with pytest.raises(ValueError, match="'bad' has dtype int64"):
        save_file({"w": np.zeros(3, np.float32), "bad": np.arange(3)}, p)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["a.safetensors"]


def test_get_unknown_name(tmp_path):
    save_file({"w": np.ones(3, np.float32)}, tmp_path / "a.safetensors")
    with SafetensorsFile(tmp_path / "a.safetensors") as f, pytest.raises(KeyError, match="'nope'"):
        f.get("nope")


def test_unaligned_data_section(tmp_path):
    """A header whose length is odd puts bf16 data at odd addresses: still read correctly."""
    from qlora_ext import quantize_nf4

    x = RNG.standard_normal(301).astype(np.float32)
    bits = f32_to_bf16_bits(x)
    p = write_raw(tmp_path / "odd.safetensors", {"w": {"dtype": "BF16", "shape": [301], "data_offsets": [0, 602]}},
                  bits.tobytes(), pad=False)
    if read_header(p)["data_start"] % 2 == 0:  # make the data start odd
        raw = json.dumps({"w": {"dtype": "BF16", "shape": [301], "data_offsets": [0, 602]}}).encode() + b" "
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + bits.tobytes())
    assert read_header(p)["data_start"] % 2 == 1
    with SafetensorsFile(p) as f:
        np.testing.assert_array_equal(f.get("w"), bf16_to_f32(bits))
        np.testing.assert_array_equal(quantize_nf4(f.get_raw("w"), dtype="bfloat16").packed,
                                      quantize_nf4(bits, dtype="bfloat16").packed)
