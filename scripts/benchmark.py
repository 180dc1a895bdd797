"""Measure Mini-Claude side by side: every number is a ratio against a baseline measured in
the same run, on the bundled SmolLM2-135M.

    python scripts/benchmark.py                       # everything (a few minutes), or: make bench
    python scripts/benchmark.py --sections decode --new-tokens 32 --repetitions 1   # quick

Sections: decode (our engines and precisions vs plain transformers generate), shape (the same
on a random-weight model with Llama 3.2 1B's shape, for users of bigger models), serving (the
API with 1/4/8/16 concurrent streaming clients, vs one client), cold (process start to first
token), structured (JSON-schema replies vs free text, same prompt and model), training (LoRA
tokens/s and peak memory: our trainer vs a plain transformers Trainer +
peft on the same data, model and settings). Results: outputs/benchmark/benchmark.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import _bootstrap

# Time to first token is also measured after a prompt of about this many tokens (issue 17:
# no slower than llama.cpp's).
LONG_PROMPT_TOKENS = 500
# Prompt lookup: a text of about this many tokens to copy out, and drafts of this many tokens.
COPY_PROMPT_TOKENS = 300
LOOKUP_TOKENS = 5
# The long prompt that arrives among short chats in the serving section's mixed load.
MIXED_LOAD_PROMPT_TOKENS = 1000


def bundled_prompts() -> tuple[Path, Any, Any, list[int], list[int]]:
    """The bundled model's folder, tokenizer and prompt format, and the two prompts every
    decode row runs: a short request for a story, and one of about LONG_PROMPT_TOKENS."""
    from transformers import AutoTokenizer

    from src.benchmarks.decode import long_prompt_for
    from src.chat.prompts import detect_prompt_format, encode_conversation
    from src.models.loader import ensure_bundled_model

    folder = ensure_bundled_model(Path(_bootstrap.REPO_ROOT) / "models")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_format = detect_prompt_format(tokenizer)
    prompt = encode_conversation(
        tokenizer, prompt_format, None, [{"role": "user", "content": "Tell me a long story."}]
    )
    return (
        folder,
        tokenizer,
        prompt_format,
        prompt,
        long_prompt_for(tokenizer, prompt_format, LONG_PROMPT_TOKENS),
    )


def run_decode(new_tokens: int, repetitions: int, perplexity_examples: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from src.benchmarks.decode import (
        EngineStream,
        engine_first_token_seconds,
        generate_first_token_seconds,
        long_prompt_for,
        prompt_lookup_row,
        time_engine,
        time_generate,
    )
    from src.benchmarks.llama_cpp import RowFailed
    from src.models.gguf_import import keep_file_codes
    from src.models.native import use_kernels
    from src.models.perplexity import held_out_perplexity
    from src.models.quantize import quantize_model
    from src.models.transformer import Transformer
    from src.training.calibration import calibration_examples

    folder, tokenizer, prompt_format, prompt, long_prompt = bundled_prompts()
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    held_out = calibration_examples(tokenizer, conversations=perplexity_examples)

    def hf(dtype: torch.dtype, quantization: str = "none"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        return quantize_model(model, quantization)

    def scratch(dtype: torch.dtype, quantization: str = "none", kernels: str = "auto"):
        model = Transformer.from_hf(hf(dtype))
        if quantization == "int4":  # as served: the GGUF file's own 4-bit codes
            keep_file_codes(model, folder)
        model = quantize_model(model, quantization)
        use_kernels(model, folder.parent, kernels, kernels, kernels, kernels)  # *_KERNEL settings
        return model

    # (name, model factory); PRECISION / QUANTIZE / ENGINE select each row in the app.
    candidates = [
        ("HF engine fp32", lambda: fp32),
        ("HF engine bf16", lambda: hf(torch.bfloat16)),
        ("HF engine bf16 + int8", lambda: hf(torch.bfloat16, "int8")),
        ("HF engine bf16 + int4", lambda: hf(torch.bfloat16, "int4")),
        ("scratch engine fp32", lambda: scratch(torch.float32)),
        ("scratch engine bf16", lambda: scratch(torch.bfloat16)),
        (
            "scratch engine bf16 + int4, PyTorch's kernels",
            lambda: scratch(torch.bfloat16, "int4", "pytorch"),
        ),
        ("scratch engine bf16 + int4 (default)", lambda: scratch(torch.bfloat16, "int4")),
    ]

    def perplexity_of(model):
        return lambda: held_out_perplexity(model, held_out)

    # (name, timing, long first token, perplexity): every row decodes the same prompt and
    # scores the same text; timing(repetitions) gives (tokens/s, first token seconds, tokens),
    # long_first(repetitions) the first token's seconds after the long prompt.
    runs = [
        (
            "transformers generate fp32 (baseline)",
            lambda count: time_generate(fp32, prompt, new_tokens, count),
            partial(generate_first_token_seconds, fp32, long_prompt),
            perplexity_of(fp32),
        )
    ]
    for name, make in candidates:
        model = make()
        stream = EngineStream(model, prompt, new_tokens)
        runs.append(
            (
                name,
                partial(time_engine, stream),
                partial(engine_first_token_seconds, model, long_prompt),
                perplexity_of(model),
            )
        )
    runs += llama_cpp_runs(prompt, long_prompt, new_tokens, held_out)
    stop_ids = {tokenizer.eos_token_id, fp32.generation_config.eos_token_id}
    rows, baseline_tokens = [], None
    for name, timing, long_first, perplexity in runs:
        print(f"  decode: {name}", flush=True)
        try:
            speed, first, tokens = timing(repetitions)
            first_after_long_prompt = long_first(repetitions)
        except RowFailed as exc:
            print(f"  decode: {name} failed: {exc}", flush=True)
            rows.append({"name": name, "failed": str(exc)})
            continue
        baseline_tokens = baseline_tokens or tokens
        # The baseline's min_new_tokens suppresses EOS while ours generates through it, so
        # compare the reply a user would see: up to our first end-of-turn token.
        reply_end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        rows.append(
            {
                "name": name,
                "tokens_per_second": speed,
                "first_token_seconds": first,
                "long_prompt_first_token_seconds": first_after_long_prompt,
                "same_tokens": tokens[:reply_end] == baseline_tokens[:reply_end],
                "perplexity": perplexity(),
            }
        )
    # Speculative decoding by prompt lookup on the default engine: a reply that repeats its
    # input (a text to copy out) and one that does not (the story above).
    default_model = scratch(torch.bfloat16, "int4")
    copy_prompt = long_prompt_for(
        tokenizer, prompt_format, COPY_PROMPT_TOKENS, "Repeat this conversation word for word:"
    )
    lookup_rows = []
    for label, lookup_prompt in (("repeats its input", copy_prompt), ("a story", prompt)):
        print(f"  decode: prompt lookup, {label}", flush=True)
        lookup_rows.append(
            prompt_lookup_row(
                default_model, label, lookup_prompt, new_tokens, repetitions, LOOKUP_TOKENS
            )
        )
    return {
        "new_tokens": new_tokens,
        "repetitions": repetitions,
        "long_prompt_tokens": len(long_prompt),
        "rows": rows,
        "prompt_lookup": lookup_rows,
    }


def run_model_shape(new_tokens: int, repetitions: int) -> dict:
    from src.benchmarks.model_shape import measure_model_shape

    # The bundled model's prompts, as token ids (they are valid ids of the bigger vocabulary).
    folder, _, _, prompt, long_prompt = bundled_prompts()
    return measure_model_shape(
        prompt, long_prompt, new_tokens, repetitions, kernel_cache_dir=folder.parent
    )


def llama_cpp_runs(
    prompt: list[int], long_prompt: list[int], new_tokens: int, held_out: list
) -> list:
    """The llama.cpp row on the bundled GGUF file, when llama-cpp-python is installed,
    measured in a process of its own (a crash there fails the row, not the benchmark)."""
    import torch

    from src.benchmarks import llama_cpp
    from src.models.bundled import bundled_gguf_path

    if not llama_cpp.available():
        print("  decode: no llama.cpp row (llama-cpp-python not installed: make setup-llamacpp)")
        return []
    threads = torch.get_num_threads()
    measured: dict = {}

    def timing(repetitions: int) -> tuple[float, float, list]:
        gguf = bundled_gguf_path()
        measured.update(
            llama_cpp.measure_in_subprocess(
                gguf, threads, prompt, long_prompt, new_tokens, repetitions, held_out
            )
        )
        return measured["tokens_per_second"], measured["first_token_seconds"], measured["tokens"]

    return [
        (
            "llama.cpp Q4_1 GGUF (llama-cpp-python)",
            timing,
            lambda repetitions: measured["long_prompt_first_token_seconds"],
            lambda: measured["perplexity"],
        )
    ]


def prepare_model_once() -> None:
    """Start the CLI once, untimed: it converts and prepares the bundled model if this machine
    has not yet (the one-time work the issue excludes), so that no timed start, and no
    server's peak memory, includes it."""
    from src.benchmarks.cold_start import cli_first_token_seconds

    cli_first_token_seconds()


def run_serving(new_tokens: int, clients: list[int], repetitions: int) -> dict:
    from src.benchmarks.decode import dialog_text
    from src.benchmarks.processes import peak_memory_mb
    from src.benchmarks.serving import measure_concurrency

    prepare_model_once()
    rows, memory, mixed = [], 0.0, []
    # The long pasted text of the mixed load (the same for both servers).
    text = dialog_text(bundled_prompts()[1], MIXED_LOAD_PROMPT_TOKENS)
    # The default server, then one that prefills every prompt in one pass, for the mixed load.
    for chunking in ("default", "0"):
        env = {"RESPONSE_CACHE_SIZE": "0"}
        if chunking != "default":
            env["PREFILL_CHUNK_TOKENS"] = chunking
        with served(env) as (process, url):
            if chunking == "default":
                api_streams = api_single_streams(url, new_tokens, repetitions)
                rows = measure_concurrency(
                    url, clients, new_tokens, repetitions, progress=lambda m: print(m, flush=True)
                )
                memory = peak_memory_mb(process.pid)
            mixed.append(mixed_load_row(url, chunking, text, repetitions))
    return {
        "new_tokens": new_tokens,
        "repetitions": repetitions,
        "rows": rows,
        "peak_memory_mb": memory,
        "mixed_load": mixed,
        "api_single_stream": api_streams,
    }


OUR_SERVER = "our server (default engine)"
LLAMA_CPP_SERVER = "llama.cpp server (llama_cpp.server, Q4_1 GGUF)"


def api_single_streams(url: str, new_tokens: int, repetitions: int) -> list[dict]:
    """One stream at a time through the OpenAI API: our server at ``url`` and, when
    llama-cpp-python's server extra is installed, llama.cpp's server on the bundled GGUF file,
    taking turns (a crash or failure there is a failed row, not a dead benchmark)."""
    import torch

    from src.benchmarks import llama_cpp
    from src.benchmarks.api_stream import (
        LLAMA_CPP_GREEDY,
        OUR_GREEDY,
        ApiServer,
        ServerFailed,
        measure_api_streams,
    )
    from src.benchmarks.decode import dialog_text
    from src.models.bundled import bundled_gguf_path

    # About LONG_PROMPT_TOKENS in all, with the system message and the chat format's tokens.
    long_text = dialog_text(bundled_prompts()[1], LONG_PROMPT_TOKENS - 40)
    ours = ApiServer(OUR_SERVER, url, OUR_GREEDY)

    def measure(servers: list[ApiServer]) -> list[dict]:
        return measure_api_streams(
            servers, long_text, new_tokens, repetitions, progress=partial(print, flush=True)
        )

    if not llama_cpp.server_available():
        print("  serving: no llama.cpp server row (needs llama-cpp-python[server]: "
              "make setup-llamacpp)", flush=True)  # fmt: skip
        return measure([ours])
    try:
        with llama_cpp.served(bundled_gguf_path(), torch.get_num_threads()) as llama_url:
            return measure([ours, ApiServer(LLAMA_CPP_SERVER, llama_url, LLAMA_CPP_GREEDY)])
    except (llama_cpp.RowFailed, ServerFailed) as failure:
        if isinstance(failure, ServerFailed) and failure.name != LLAMA_CPP_SERVER:
            raise  # ours failed: that is a bug to see, not a row to skip
        print(f"  serving: the llama.cpp server row failed: {failure}", flush=True)
        return [*measure([ours]), {"name": LLAMA_CPP_SERVER, "failed": str(failure)}]


@contextmanager
def served(env: dict[str, str]) -> Iterator[tuple[Any, str]]:
    """A real server (uvicorn, the bundled model, a fresh data folder) with ``env``: its
    process and URL once it is ready; stopped afterwards."""
    from src.benchmarks.processes import start_server, stop, wait_until_ready

    with tempfile.TemporaryDirectory() as data_dir:
        process, url = start_server(Path(data_dir), **env)
        try:
            wait_until_ready(url, process)
            yield process, url
        finally:
            stop(process)


def mixed_load_row(url: str, chunking: str, text: str, repetitions: int) -> dict:
    """Short chats arriving one after another with ``text`` pasted among them (medians over
    ``repetitions`` rounds, each text told apart, so no round reuses a cached one)."""
    import asyncio
    import statistics

    from src.benchmarks.serving import measure_mixed_load
    from src.config import Settings

    default = Settings.model_fields["prefill_chunk_tokens"].default
    label = f"{default} (default)" if chunking == "default" else chunking
    print(f"  serving: mixed load, PREFILL_CHUNK_TOKENS={label}", flush=True)
    rounds = [
        asyncio.run(measure_mixed_load(url, f"Text {index}: summarise it.\n\n{text}"))
        for index in range(repetitions)
    ]
    return {"prefill_chunk_tokens": label} | {
        key: statistics.median(r[key] for r in rounds) for key in rounds[0]
    }


def run_structured(new_tokens: int, repetitions: int) -> dict:
    from src.benchmarks.structured import measure_structured
    from src.config import load_settings
    from src.stack import build_chat_stack

    prepare_model_once()
    settings = load_settings().model_copy(update={"model_name": "smollm2-135m-instruct"})
    stack = build_chat_stack(settings, background=False)
    try:
        print("  structured: free text and JSON schema", flush=True)
        return measure_structured(stack.service, new_tokens, repetitions)
    finally:
        stack.close()


def run_cold_start(repetitions: int) -> dict:
    import statistics

    from src.benchmarks.cold_start import cli_first_token_seconds, server_first_token_seconds

    print("  cold start", flush=True)
    prepare_model_once()
    cli = statistics.median(cli_first_token_seconds() for _ in range(repetitions))
    servers = [server_first_token_seconds() for _ in range(repetitions)]
    return {
        "repetitions": repetitions,
        "cli_first_token_seconds": cli,
        "server_ready_seconds": statistics.median(ready for ready, _ in servers),
        "server_first_token_seconds": statistics.median(first for _, first in servers),
    }


def run_training(steps: int, repetitions: int, examples: int, max_length: int | None) -> dict:
    from src.benchmarks.training import measure_training

    return measure_training(
        steps, repetitions, examples, max_length, progress=lambda m: print(m, flush=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="decode,shape,serving,structured,cold,training")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument(
        "--perplexity-examples",
        type=int,
        default=40,
        help="held-out chitchat conversations for the perplexity column",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=4,
        help="timed LoRA optimizer steps per trainer (after one untimed warm-up step)",
    )
    parser.add_argument(
        "--train-repetitions",
        type=int,
        default=2,
        help="runs of each trainer (one process each) for the training section",
    )
    parser.add_argument(
        "--train-examples",
        type=int,
        default=200,
        help="chitchat conversations tokenized for the training section",
    )
    parser.add_argument(
        "--train-max-length",
        type=int,
        help="cut training examples to this many tokens (default: configs/lora_default.yaml)",
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark"))
    args = parser.parse_args(argv)
    import torch

    from src.benchmarks.report import machine_description, markdown, write_reports

    torch.set_num_threads(torch.get_num_threads())
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"decode", "shape", "serving", "cold", "training", "structured"}
    if unknown:
        print(
            f"Error: unknown sections {sorted(unknown)}; use decode, shape, serving, cold, "
            "training, structured",
            file=sys.stderr,
        )
        return 2
    if min(args.train_steps, args.train_repetitions) < 1 or args.train_examples < 2:
        print(
            "Error: --train-steps and --train-repetitions must be at least 1, --train-examples "
            "at least 2",
            file=sys.stderr,
        )
        return 2
    clients = [int(c) for c in args.clients.split(",")]
    # (section, key in the results, how to run it), in the order they run.
    runs = [
        ("decode", "decode", lambda: run_decode(args.new_tokens, args.repetitions,
                                                args.perplexity_examples)),
        # A token of the bigger model takes about ten of the bundled one's: fewer of them.
        ("shape", "model_shape", lambda: run_model_shape(min(args.new_tokens, 32),
                                                         args.repetitions)),
        ("serving", "serving", lambda: run_serving(min(args.new_tokens, 64), clients,
                                                   args.repetitions)),
        ("structured", "structured", lambda: run_structured(args.new_tokens, args.repetitions)),
        ("cold", "cold_start", lambda: run_cold_start(args.repetitions)),
        ("training", "training", lambda: run_training(args.train_steps, args.train_repetitions,
                                                      args.train_examples, args.train_max_length)),
    ]  # fmt: skip
    results: dict = {"machine": machine_description()}
    for section, key, run in runs:
        if section in sections:
            results[key] = run()
            write_reports(results, args.output)  # a later section's failure keeps this one
    paths = write_reports(results, args.output)
    print(markdown(results))
    print("Written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
