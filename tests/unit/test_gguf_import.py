"""Reading GGUF files without converting them: the 4-bit blocks decoded exactly, MODEL_NAME
finding the file, clear errors for what we cannot serve, and QUANTIZE=auto's choice per file."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, dequantize, quantize

from src.errors import ModelLoadingError
from src.models.gguf_import import find_gguf_file, four_bit_groups, pack_codes, read_summary
from tests.gguf_files import random_k_blocks

pytestmark = pytest.mark.unit
Q = GGMLQuantizationType


def small_gguf(path, arch="llama", tensors=None):
    """A file with only a header and the given (name -> (array, type)) tensors."""
    writer = GGUFWriter(str(path), arch)
    for name, (array, kind) in (tensors or {}).items():
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_four_bit_blocks_decode_to_the_files_weights_exactly(kind):
    rows, width = 8, 512
    weights = np.random.default_rng(0).normal(0, 0.05, (rows, width)).astype(np.float32)
    # gguf-py cannot quantise K-quants: random blocks are valid ones.
    data = random_k_blocks(weights.shape, Q.Q4_K) if kind == "Q4_K" else quantize(weights, Q[kind])
    codes, scale, low = four_bit_groups(data, kind)
    assert codes.shape == (rows, width) and codes.max() <= 15
    assert scale.shape == low.shape == (rows, width // 32)
    rebuilt = (codes.reshape(rows, -1, 32) * scale[..., None] + low[..., None]).reshape(rows, -1)
    np.testing.assert_array_equal(rebuilt, dequantize(data, Q[kind]))


def test_codes_pack_two_per_byte_low_half_first():
    codes = np.array([[1, 2, 15, 0]], dtype=np.uint8)
    assert pack_codes(codes).tolist() == [[0x21, 0x0F]]


def test_model_name_finds_a_file_or_the_one_file_in_a_folder(tmp_path):
    assert find_gguf_file(str(tmp_path)) is None  # a folder without one: not GGUF
    model = small_gguf(tmp_path / "tiny.Q4_0.gguf")
    assert find_gguf_file(str(model)) == model
    assert find_gguf_file(str(tmp_path)) == model
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf_file(str(tmp_path)) is None  # a model folder that happens to hold one


def test_several_files_or_a_missing_file_are_named(tmp_path):
    small_gguf(tmp_path / "a.gguf")
    small_gguf(tmp_path / "b.gguf")
    with pytest.raises(ModelLoadingError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        find_gguf_file(str(tmp_path))
    with pytest.raises(ModelLoadingError, match="names a GGUF file, but there is none"):
        find_gguf_file(str(tmp_path / "missing.gguf"))


def test_an_unknown_architecture_is_named(tmp_path):
    path = small_gguf(tmp_path / "odd.gguf", arch="nonesuch")
    with pytest.raises(ModelLoadingError, match="architecture 'nonesuch', which we cannot load"):
        read_summary(path)


def test_an_unsupported_tensor_type_is_named_with_a_tensor(tmp_path):
    block, size = GGML_QUANT_SIZES[Q.IQ4_NL]
    blocks = np.random.default_rng(0).integers(0, 256, (4, 64 // block * size), dtype=np.uint8)
    path = small_gguf(tmp_path / "iq.gguf", tensors={"blk.0.ffn_up.weight": (blocks, Q.IQ4_NL)})
    with pytest.raises(ModelLoadingError, match=r"type IQ4_NL \(for example blk.0.ffn_up.weight\)"):
        read_summary(path)


def test_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(small_gguf(tmp_path / "whole.gguf").read_bytes()[:10])
    with pytest.raises(ModelLoadingError, match="cut.gguf is not a readable GGUF file"):
        read_summary(path)


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ((Q.Q4_0, Q.Q4_K), "int4"),  # 4-bit codes kept as they are
        ((Q.Q4_0, Q.Q6_K, Q.Q6_K), "int8"),  # mostly 6-bit: int4 would lose what it kept
        ((Q.F16, Q.F16), "none"),
    ],
)
def test_quantize_auto_follows_the_files_matrices(tmp_path, kinds, expected):
    weights = np.random.default_rng(0).normal(0, 0.05, (16, 256)).astype(np.float32)
    tensors = {}
    for index, kind in enumerate(kinds):
        if kind in (Q.Q4_K, Q.Q6_K):
            data = random_k_blocks(weights.shape, kind)
        elif kind is Q.F16:
            data = weights.astype(np.float16)
        else:
            data = quantize(weights, kind)
        tensors[f"blk.{index}.ffn_up.weight"] = (data, None if kind is Q.F16 else kind)
    # The embeddings do not count (files keep them at higher precision).
    tensors["token_embd.weight"] = (weights.astype(np.float16), None)
    summary = read_summary(small_gguf(tmp_path / "m.gguf", tensors=tensors))
    assert summary.quantization == expected
