"""The optional llama.cpp row of the decode table: the bundled GGUF file itself (Q4_1) run by
llama-cpp-python, what an Ollama user gets on the same model.

llama-cpp-python is an optional extra (``make setup-llamacpp``: pip builds it from source,
about 10 minutes on 2 cores); without it the benchmark leaves the row out and says so. The
prompt and the held-out conversations are the same token ids as every other row's (the GGUF
file carries the same vocabulary our tokenizer was converted from).

The build: ``cmake_args`` turns on each instruction set the CPU reports, instead of llama.cpp's
default ``-march=native``, and never AMX: a native build crashed with SIGSEGV in its first
decode on these machines, whose CPUs report AMX (README "Performance"). The row runs in a
process of its own (``measure_in_subprocess``), so a crash there is a failed row in the
table, not a dead benchmark.

    python -m src.benchmarks.llama_cpp --cmake-args     # what make setup-llamacpp passes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

# ggml's build options for x86 and the /proc/cpuinfo flags each one needs.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
GGML_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": _AVX512,
    "GGML_AVX512_VBMI": (*_AVX512, "avx512vbmi"),
    "GGML_AVX512_VNNI": (*_AVX512, "avx512_vnni"),
    "GGML_AVX512_BF16": (*_AVX512, "avx512_bf16"),
}
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


class RowFailed(Exception):
    """The llama.cpp row could not be measured (its process crashed or failed)."""


def cmake_args(flags: list[str] | None) -> str:
    """CMAKE_ARGS for building llama-cpp-python on a CPU with ``flags`` (None: not Linux,
    llama.cpp's own defaults)."""
    if flags is None:
        return ""
    present = set(flags)
    options = ["-DGGML_NATIVE=OFF"]
    for name, needs in GGML_OPTIONS.items():
        options.append(f"-D{name}={'ON' if all(flag in present for flag in needs) else 'OFF'}")
    options += [f"-D{name}=OFF" for name in NEVER]
    return " ".join(options)


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def server_available() -> bool:
    """llama-cpp-python with its server's extra (``llama-cpp-python[server]``)."""
    return available() and all(
        importlib.util.find_spec(module) for module in ("sse_starlette", "starlette_context")
    )


@contextmanager
def served(gguf: Path, threads: int, context: int = 2048, timeout: float = 180) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``) on ``gguf``, on
    127.0.0.1 and a free port, as its users start it with the thread count of our rows: its
    URL once it answers; stopped afterwards. Raises ``RowFailed`` if it does not start."""
    from src.benchmarks.processes import free_port, stop, wait_until_ready

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
               "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--n_ctx", str(context), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=output)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until_ready(url, process, timeout, path="/v1/models")
            except RuntimeError as exc:
                process.poll()
                raise RowFailed(exit_reason(process.returncode, read_log(log))) from exc
            try:
                yield url
            except Exception as exc:  # a crash mid-stream: say how the server ended
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)  # its connections close before it is reaped
                if process.returncode is not None:
                    raise RowFailed(exit_reason(process.returncode, read_log(log))) from exc
                raise
            if process.poll() is not None:  # ended during the last request, which still ended
                raise RowFailed(exit_reason(process.returncode, read_log(log)))
        finally:
            stop(process)


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")


def exit_reason(returncode: int | None, output: str) -> str:
    """Why a llama.cpp process ended: the signal that killed it, or its exit status and the
    last line it wrote."""
    if returncode is None:
        return "did not start in time"
    if returncode < 0:
        return f"llama.cpp crashed ({signal.Signals(-returncode).name})"
    return f"exit status {returncode}: {(output.strip().splitlines() or ['no message'])[-1]}"


def load(gguf: Path, threads: int, context: int = 2048, logits_all: bool = False) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,  # every position's logits: needed for perplexity only
        verbose=False,
    )


def llama_cpp_stream(llm: Any, prompt: list[int], new_tokens: int) -> Callable[[], Iterator[int]]:
    """Greedy decoding of exactly ``new_tokens`` tokens (like the baseline, through EOS)."""

    def stream() -> Iterator[int]:
        # Forget the previous repetition: llama-cpp-python would otherwise reuse the prompt's
        # cached keys and values, and time to first token would skip the prompt (our engines
        # in this table run it every time).
        llm.reset()
        tokens = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True)
        for _, token in zip(range(new_tokens), tokens, strict=False):
            yield int(token)

    return stream


def llama_cpp_perplexity(llm: Any, examples: list[dict[str, list[int]]]) -> float:
    """Perplexity on the assistant tokens of held-out conversations, as
    ``src.models.perplexity.held_out_perplexity`` computes it for the PyTorch rows. ``llm``
    must be loaded with ``logits_all=True``."""
    total, count = 0.0, 0
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T - 1, V)
        targets = np.asarray(labels[1:])
        keep = targets != -100
        logits, targets = logits[keep], targets[keep]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += int(keep.sum())
    return math.exp(total / count)


def measure_in_subprocess(
    gguf: Path,
    threads: int,
    prompt: list[int],
    long_prompt: list[int],
    new_tokens: int,
    repetitions: int,
    held_out: list[dict[str, list[int]]],
    timeout: float = 1800,
) -> dict[str, Any]:
    """The row's tokens/s, first-token seconds (after ``prompt`` and after ``long_prompt``),
    tokens and perplexity, measured by
    ``python -m src.benchmarks.llama_cpp --row`` in a process of its own. Raises
    ``RowFailed`` naming what went wrong (a signal, an exit status, a timeout)."""
    with tempfile.TemporaryDirectory() as folder:
        request, result = Path(folder) / "request.json", Path(folder) / "result.json"
        request.write_text(
            json.dumps(
                {
                    "gguf": str(gguf),
                    "threads": threads,
                    "prompt": prompt,
                    "long_prompt": long_prompt,
                    "new_tokens": new_tokens,
                    "repetitions": repetitions,
                    "held_out": held_out,
                }
            )
        )
        command = [sys.executable, "-m", "src.benchmarks.llama_cpp", "--row", str(request)]
        try:
            done = subprocess.run(
                [*command, str(result)],
                cwd=Path(__file__).resolve().parents[2],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise RowFailed(f"no result after {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise RowFailed(exit_reason(done.returncode, done.stderr))
        return json.loads(result.read_text())


def _measure(request: dict[str, Any]) -> dict[str, Any]:
    """What ``measure_in_subprocess`` asks for, in this process."""
    from src.benchmarks.decode import time_stream

    gguf, threads, repetitions = Path(request["gguf"]), request["threads"], request["repetitions"]
    llm = load(gguf, threads)
    stream = llama_cpp_stream(llm, request["prompt"], request["new_tokens"])
    speed, first, tokens = time_stream(stream, repetitions)
    long_first = time_stream(llama_cpp_stream(llm, request["long_prompt"], 1), repetitions)[1]
    perplexity = llama_cpp_perplexity(load(gguf, threads, logits_all=True), request["held_out"])
    return {
        "tokens_per_second": speed,
        "first_token_seconds": first,
        "long_prompt_first_token_seconds": long_first,
        "tokens": tokens,
        "perplexity": perplexity,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--cmake-args", action="store_true", help="print CMAKE_ARGS for this CPU")
    group.add_argument("--row", nargs=2, metavar=("REQUEST", "RESULT"), type=Path,
                       help="measure the row described in REQUEST (JSON) into RESULT")  # fmt: skip
    args = parser.parse_args(argv)
    if args.cmake_args:
        from src.models.cpu_info import cpu_flags

        print(cmake_args(cpu_flags()))
        return 0
    request_file, result_file = args.row
    result_file.write_text(json.dumps(_measure(json.loads(request_file.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
