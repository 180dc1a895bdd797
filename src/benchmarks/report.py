"""Benchmark results as JSON, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def machine_description() -> str:
    import os

    from src.models.cpu_info import cpu_description

    return (
        f"{cpu_description()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    decode = results.get("decode")
    if decode:
        baseline = decode["rows"][0]["tokens_per_second"]
        lines += [
            f"**Single-stream decode**, {decode['new_tokens']} new tokens, greedy, median of "
            f"{decode['repetitions']}:",
            "",
            *table(
                [
                    "engine",
                    "tokens/s",
                    "vs baseline",
                    "first token (s)",
                    f"first token, {decode.get('long_prompt_tokens', '-')}-token prompt (s)",
                    "same tokens as baseline",
                    "held-out perplexity",
                ],
                [decode_cells(row, baseline) for row in decode["rows"]],
            ),
            "",
        ]
        if decode.get("prompt_lookup"):
            lines += prompt_lookup_markdown(decode["prompt_lookup"])
    if results.get("model_shape"):
        lines += model_shape_markdown(results["model_shape"])
    serving = results.get("serving")
    if serving:
        one = serving["rows"][0]["aggregate_tokens_per_second"]
        rounds = serving.get("repetitions", 1)
        lines += [
            f"**API, concurrent streaming clients**, {serving['new_tokens']} new tokens each, "
            f"{f'medians of {rounds} rounds' if rounds > 1 else 'one round'}; server peak memory "
            f"{serving['peak_memory_mb']:.0f} MB:",
            "",
            *table(
                [
                    "clients",
                    "aggregate tokens/s",
                    "vs 1 client",
                    "first token p50/p95 (s)",
                    "latency p50/p95 (s)",
                    "load generator CPU per token (ms)",
                ],
                [
                    [
                        str(row["clients"]),
                        f"{row['aggregate_tokens_per_second']:.1f}",
                        f"{row['aggregate_tokens_per_second'] / one:.2f}x",
                        f"{row['first_token_p50']:.2f} / {row['first_token_p95']:.2f}",
                        f"{row['latency_p50']:.2f} / {row['latency_p95']:.2f}",
                        number(row.get("client_cpu_ms_per_token"), ".2f"),
                    ]
                    for row in serving["rows"]
                ],
            ),
            "",
        ]
        if serving.get("mixed_load"):
            lines += mixed_load_markdown(serving["mixed_load"])
        if serving.get("api_single_stream"):
            lines += api_stream_markdown(serving["api_single_stream"], rounds)
    structured = results.get("structured")
    if structured:
        free = structured["rows"][0]["tokens_per_second"]
        lines += [
            f"**Structured outputs**: the bundled model, greedy, up to {structured['new_tokens']} "
            f"tokens, median of {structured['repetitions']}; the grammar's mask alone costs "
            f"{structured['mask_microseconds_per_token']:.0f} µs per token:",
            "",
            *table(
                ["reply", "tokens/s", "vs free text", "tokens"],
                [
                    [
                        row["name"],
                        f"{row['tokens_per_second']:.1f}",
                        f"{row['tokens_per_second'] / free:.2f}x",
                        str(row["tokens"]),
                    ]
                    for row in structured["rows"]
                ],
            ),
            "",
        ]
    cold = results.get("cold_start")
    if cold:
        lines += [
            f"**Cold start** (model already converted and prepared; median of "
            f"{cold.get('repetitions', 1)}): CLI process start to first token "
            f"{cold['cli_first_token_seconds']:.2f} s; server start to ready "
            f"{cold['server_ready_seconds']:.2f} s, to first streamed token "
            f"{cold['server_first_token_seconds']:.2f} s.",
            "",
        ]
    training = results.get("training")
    if training:
        lines += training_markdown(training)
    return "\n".join(lines)


def prompt_lookup_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The prompt-lookup table: the default engine with and without drafts, per prompt."""
    return [
        f"**Prompt lookup** (speculative decoding, `PROMPT_LOOKUP_TOKENS="
        f"{rows[0]['prompt_lookup_tokens']}`), the default engine, same prompt with and "
        "without drafts:",
        "",
        *table(
            [
                "prompt",
                "tokens/s without",
                "tokens/s with",
                "speed-up",
                "tokens per pass",
                "drafts accepted",
                "same tokens",
            ],
            [
                [
                    row["prompt"],
                    f"{row['plain_tokens_per_second']:.1f}",
                    f"{row['tokens_per_second']:.1f}",
                    f"{row['tokens_per_second'] / row['plain_tokens_per_second']:.2f}x",
                    f"{row['tokens_per_pass']:.2f}",
                    f"{row['drafts_accepted']:.0%}",
                    "yes" if row["same_tokens"] else "no",
                ]
                for row in rows
            ],
        ),
        "",
    ]


def model_shape_markdown(shape: dict[str, Any]) -> list[str]:
    """The bigger-model table: the same columns as the decode table, with weight memory."""
    config = shape["shape"]
    baseline = shape["rows"][0]["tokens_per_second"]
    return [
        f"**A bigger model shape**: Llama 3.2 1B's ({shape['parameters'] / 1e9:.2f} B "
        f"parameters: {config['num_hidden_layers']} layers, width {config['hidden_size']}, "
        f"{config['num_attention_heads']} heads and {config['num_key_value_heads']} for keys "
        f"and values, vocabulary {config['vocab_size']:,}) with random weights (speed "
        f"depends on the shape, not the values), {shape['new_tokens']} new tokens, greedy, "
        f"median of {shape['repetitions']}:",
        "",
        *table(
            [
                "engine",
                "tokens/s",
                "vs baseline",
                "first token (s)",
                f"first token, {shape['long_prompt_tokens']}-token prompt (s)",
                "weights (MB)",
            ],
            [
                [
                    row["name"],
                    f"{row['tokens_per_second']:.1f}",
                    f"{row['tokens_per_second'] / baseline:.2f}x",
                    f"{row['first_token_seconds']:.3f}",
                    f"{row['long_prompt_first_token_seconds']:.3f}",
                    f"{row['weights_mb']:,.0f}",
                ]
                for row in shape["rows"]
            ],
        ),
        "",
    ]


def mixed_load_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Short chats arriving one by one with a long prompt among them, per PREFILL_CHUNK_TOKENS."""
    return [
        f"**Mixed load**: {rows[0]['clients']:.0f} short chats arriving 0.25 s apart, and a pasted "
        "text of about 1,000 tokens arriving among them (medians of the rounds):",
        "",
        *table(
            [
                "`PREFILL_CHUNK_TOKENS`",
                "short chats: first token p50 / p95 (s)",
                "longest pause of a short reply p50 / max (s)",
                "long prompt: first token (s)",
                "aggregate tokens/s",
            ],
            [
                [
                    str(row["prefill_chunk_tokens"]),
                    f"{row['first_token_p50']:.2f} / {row['first_token_p95']:.2f}",
                    f"{row['longest_pause_p50']:.2f} / {row['longest_pause_max']:.2f}",
                    f"{row['long_prompt_first_token']:.2f}",
                    f"{row['aggregate_tokens_per_second']:.1f}",
                ]
                for row in rows
            ],
        ),
        "",
    ]


def api_stream_markdown(rows: list[dict[str, Any]], rounds: int) -> list[str]:
    """One stream at a time through the OpenAI API, our server and llama.cpp's; speed ratios
    against llama.cpp's when its row is there."""
    llama = next((r for r in rows if "llama.cpp" in r["name"] and "failed" not in r), None)
    if llama is not None and llama["tokens_per_second"] <= 0:
        llama = None  # nothing to compare with (a reply of one token)
    prompt = next((r["long_prompt_tokens"] for r in rows if r.get("long_prompt_tokens")), "-")

    def cells(row: dict[str, Any]) -> list[str]:
        if "failed" in row:
            return [row["name"], f"failed: {row['failed']}", "-", "-", "-", "-"]
        ratio = f"{row['tokens_per_second'] / llama['tokens_per_second']:.2f}x" if llama else "-"
        return [
            row["name"],
            f"{row['tokens_per_second']:.1f}",
            ratio,
            f"{row['first_token_seconds']:.3f}",
            f"{row['long_prompt_first_token_seconds']:.3f}",
            str(row["tokens"]),
        ]

    return [
        "**One stream through the OpenAI API** (`/v1/chat/completions`, streamed, greedy, the "
        f"same requests to each server in turn; medians of {rounds}):",
        "",
        *table(
            [
                "server",
                "tokens/s",
                "vs llama.cpp",
                "first token (s)",
                f"first token, {prompt}-token prompt (s)",
                "tokens",
            ],
            [cells(row) for row in rows],
        ),
        "",
    ]


def decode_cells(row: dict[str, Any], baseline: float) -> list[str]:
    """One row of the decode table; a row that could not be measured says why."""
    if "failed" in row:
        return [row["name"], f"failed: {row['failed']}", "-", "-", "-", "-", "-"]
    return [
        row["name"],
        f"{row['tokens_per_second']:.1f}",
        f"{row['tokens_per_second'] / baseline:.2f}x",
        f"{row['first_token_seconds']:.3f}",
        number(row.get("long_prompt_first_token_seconds"), ".3f"),
        "yes" if row["same_tokens"] else "no",
        f"{row['perplexity']:.2f}" if row.get("perplexity") else "-",
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def training_markdown(training: dict[str, Any]) -> list[str]:
    settings, rows = training["settings"], training["rows"]
    baseline = rows[0]
    targets = settings.get("lora_target_modules") or "default"
    lines = [
        f"**LoRA training**, {training['steps']} timed optimizer steps after "
        f"{training['warmup_steps']} warm-up step, batch {settings['batch_size']} x "
        f"{settings['gradient_accumulation_steps']} accumulation, max length "
        f"{settings['max_length']}, LoRA r={settings['lora_rank']} "
        f"alpha={settings['lora_alpha']:g} dropout={settings['lora_dropout']:g} "
        f"targets {targets}, fp32, {settings['examples']} chitchat conversations; each trainer "
        f"in its own process, {training['repetitions']} runs each; same micro-batches on both "
        f"sides: {'yes' if training['same_batches'] else 'NO'}:",
        "",
        *table(
            [
                "trainer",
                "tokens/s",
                "vs baseline",
                "s/step",
                "peak RSS in training (MB)",
                "added by training (MB)",
                "mean train loss",
                "held-out loss after",
            ],
            [
                [
                    row["name"],
                    f"{row['tokens_per_second']:.1f}",
                    f"{row['tokens_per_second'] / baseline['tokens_per_second']:.2f}x",
                    f"{row['step_seconds']:.2f}",
                    number(row["training_peak_memory_mb"], ".0f"),
                    number(row["training_extra_memory_mb"], ".0f"),
                    number(row["train_loss_mean"], ".4f"),
                    number(row["held_out_loss"], ".4f"),
                ]
                for row in rows
            ],
        ),
    ]
    lines += [
        "",
        "Tokens/s and s/step: medians over every timed step of every run (tokens/s of a step: "
        "its non-padding tokens over its wall time; the timed steps hold "
        f"{rows[0]['tokens']:,} tokens for the baseline, {rows[-1]['tokens']:,} for ours). "
        "Memory, losses: medians over the runs. Peak RSS: the process's VmHWM, reset just "
        "before training; added by training: that peak minus the resident memory just before "
        "training (model, data and trainer loaded). Losses: mean training loss over all steps, "
        "and loss on the held-out split after training.",
        "",
    ]
    return lines


def chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("decode", "serving", "training") if results.get(key)]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4))
    axes = [axes] if len(panels) <= 1 else list(axes)
    for axis, key in zip(axes, panels, strict=False):
        if key == "decode":
            rows = [r for r in results["decode"]["rows"] if "failed" not in r]
            axis.barh([r["name"] for r in rows], [r["tokens_per_second"] for r in rows])
            axis.set_xlabel("tokens/s (single stream)")
            axis.invert_yaxis()
        elif key == "training":
            rows = results["training"]["rows"]
            bars = axis.barh([r["name"] for r in rows], [r["tokens_per_second"] for r in rows])
            memory = [r["training_peak_memory_mb"] for r in rows]
            axis.bar_label(bars, [f" peak {m:.0f} MB" if m else "" for m in memory])
            axis.margins(x=0.45)  # room for the memory labels
            axis.set_xlabel("LoRA training tokens/s")
            axis.invert_yaxis()
        else:
            rows = results["serving"]["rows"]
            axis.plot(
                [r["clients"] for r in rows], [r["aggregate_tokens_per_second"] for r in rows], "o-"
            )
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel("aggregate tokens/s")
        axis.grid(alpha=0.3)
    figure.suptitle("Mini-Claude benchmark")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_reports(results: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "benchmark.json").write_text(json.dumps(results, indent=2))
    (folder / "benchmark.md").write_text(markdown(results))
    return [
        folder / "benchmark.json",
        folder / "benchmark.md",
        chart(results, folder / "benchmark.png"),
    ]
