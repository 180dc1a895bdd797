"""The benchmark's llama.cpp row: built for the CPU's instruction sets without AMX, and run in
a process of its own so that a crash there fails the row, not the benchmark. The real
llama-cpp-python takes 10 minutes to build (``make setup-llamacpp``), so these tests put a
stand-in package named ``llama_cpp`` first on the child's path."""

import textwrap

import pytest

from src.benchmarks import llama_cpp
from src.benchmarks.report import markdown

AVX2_ONLY = ["fpu", "avx", "avx2", "fma", "f16c", "bmi2"]
SAPPHIRE_RAPIDS = [*AVX2_ONLY, "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
                   "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]  # fmt: skip


def options(args: str) -> dict[str, str]:
    return dict(part.removeprefix("-D").split("=") for part in args.split())


def test_cmake_args_follow_the_cpu_and_never_turn_on_amx():
    avx2 = options(llama_cpp.cmake_args(AVX2_ONLY))
    assert avx2["GGML_NATIVE"] == "OFF" and avx2["GGML_AVX2"] == "ON"
    assert avx2["GGML_AVX512"] == "OFF" and avx2["GGML_AVX512_BF16"] == "OFF"
    newer = options(llama_cpp.cmake_args(SAPPHIRE_RAPIDS))
    assert newer["GGML_AVX512"] == newer["GGML_AVX512_VNNI"] == newer["GGML_AVX512_BF16"] == "ON"
    assert newer["GGML_AVX512_VBMI"] == "OFF"  # not reported
    assert {newer[name] for name in llama_cpp.NEVER} == {"OFF"}
    assert llama_cpp.cmake_args(None) == ""  # not Linux: llama.cpp's own defaults


STAND_IN = """
import os, signal

class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, logits_all, verbose):
        if {crash}:
            os.kill(os.getpid(), signal.SIGSEGV)
        self.scores = [[0.0, 1.0, 2.0]] * 8

    def reset(self):
        pass

    def generate(self, prompt, **sampling):
        while True:
            yield 2

    def eval(self, ids):
        pass
"""


def stand_in(tmp_path, monkeypatch, crash: bool) -> None:
    package = tmp_path / "llama_cpp"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(STAND_IN.format(crash=crash)))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def measure(tmp_path):
    held_out = [{"input_ids": [1, 2, 1], "labels": [-100, 2, 1]}]
    return llama_cpp.measure_in_subprocess(
        tmp_path / "m.gguf", 1, [1, 2], [1, 2, 1, 2], 5, 2, held_out
    )


def test_the_row_is_measured_in_a_process_of_its_own(tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch, crash=False)
    result = measure(tmp_path)
    assert result["tokens"] == [2] * 5 and result["tokens_per_second"] > 0
    assert result["perplexity"] > 1.0 and result["long_prompt_first_token_seconds"] > 0


def test_a_crash_fails_the_row_by_name_and_the_table_says_so(tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch, crash=True)
    with pytest.raises(llama_cpp.RowFailed, match=r"crashed \(SIGSEGV\)") as failure:
        measure(tmp_path)
    baseline = {"name": "baseline", "tokens_per_second": 10.0, "first_token_seconds": 0.1,
                "same_tokens": True, "perplexity": 9.0}  # fmt: skip
    failed = {"name": "llama.cpp", "failed": str(failure.value)}
    results = {"machine": "test", "decode": {"new_tokens": 5, "repetitions": 2,
                                              "rows": [baseline, failed]}}  # fmt: skip
    table = markdown(results)
    assert "| llama.cpp | failed: llama.cpp crashed (SIGSEGV) | - | - | - | - | - |" in table
    assert "| baseline | 10.0 | 1.00x | 0.100 | - | yes | 9.00 |" in table
