"""Load-test the API on this machine (loopback only, bounded in count and time).

    python scripts/load_test.py                                   # or: make load-test
    python scripts/load_test.py --clients 32 --duration 120 --disconnect-fraction 0.2
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid 1234   # a running server

Without --url it starts the real server (uvicorn src.web.api:app, the bundled model as
served by default) on 127.0.0.1 with a fresh DATA_DIR and MAX_STREAMS_PER_CLIENT above the
client count (every client shares the loopback address, so the per-client limit would
otherwise answer 429). Concurrent clients mix /chat (with and without a session),
/chat/stream, and /v1/chat/completions plain and streamed; a fraction hang up mid-stream.
Prints a table, writes JSON (--output), and exits with status 1 when any request failed, a
session holds other than its completed exchanges, the server logged an error, or its memory
grew by more than --max-growth-mb after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import _bootstrap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from src.benchmarks.load import ALLOWED_GROWTH_MB

    parser = argparse.ArgumentParser(description="Load-test the Mini-Claude API.")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per client (default 30)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="stop starting requests after N seconds"
    )
    parser.add_argument(
        "--disconnect-fraction",
        type=float,
        default=0.1,
        help="share of requests that hang up after the first text (0.1)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=12, help="tokens per reply (12)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up requests per client (2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the load this many times, measuring memory after each (a leak keeps growing)",
    )
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds to wait before the last memory figure"
    )
    parser.add_argument(
        "--max-growth-mb",
        type=float,
        default=ALLOWED_GROWTH_MB,
        help="fail if the server's memory grows more than this after the warm-up "
        f"({ALLOWED_GROWTH_MB}: 150 plus the default prefix cache)",
    )
    parser.add_argument(
        "--adapters",
        type=int,
        default=0,
        help="make this many LoRA adapters (random weights) and send some /chat requests "
        "through them; with MAX_LOADED_ADAPTERS=2 the server loads and evicts them (0)",
    )
    parser.add_argument(
        "--turns", type=int, default=4, help="exchanges per session before a new one (4)"
    )
    parser.add_argument(
        "--sigkill-at",
        type=float,
        help="seconds into the load: kill the server (SIGKILL) and start it again on its data",
    )
    parser.add_argument(
        "--sigterm-at",
        type=float,
        help="seconds into the load: stop the server (SIGTERM, graceful) and start it again",
    )
    parser.add_argument(
        "--max-rss-mb",
        type=float,
        help="fail if the (last) server process's memory goes over this after its first minute",
    )
    parser.add_argument(
        "--sample-seconds", type=float, default=10.0, help="memory sampling interval (10)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="a running server to load instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (memory)")
    parser.add_argument("--api-key", help="with --url: the server's API_KEY")
    parser.add_argument(
        "--output",
        type=Path,
        default=_bootstrap.REPO_ROOT / "outputs" / "load" / "load.json",
        help="the JSON report (outputs/load/load.json)",
    )
    args = parser.parse_args(argv)
    if args.requests is None and args.duration is None:
        args.requests = 30
    if min(args.clients, args.rounds, args.requests or 1) < 1:
        parser.error("--clients, --requests and --rounds must be at least 1")
    if not 0 <= args.disconnect_fraction <= 1:
        parser.error("--disconnect-fraction must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from src.benchmarks.load import LoadConfig, format_report, run_load, server_log_errors
    from src.benchmarks.processes import ServerSupervisor

    config = LoadConfig(
        clients=args.clients,
        requests=args.requests,
        duration=args.duration,
        disconnect_fraction=args.disconnect_fraction,
        max_new_tokens=args.max_new_tokens,
        warmup_requests=args.warmup,
        rounds=args.rounds,
        settle_seconds=args.settle,
        seed=args.seed,
        api_key=args.api_key,
        turns_per_session=args.turns,
        sample_seconds=args.sample_seconds,
    )
    disruptions = sorted(
        (at, signum)
        for at, signum in ((args.sigkill_at, signal.SIGKILL), (args.sigterm_at, signal.SIGTERM))
        if at is not None
    )
    if args.url and (disruptions or args.adapters):
        print(
            "Error: --sigkill-at, --sigterm-at and --adapters need a server of our own (no --url)"
        )
        return 2
    if args.url:
        report = run_load(args.url.rstrip("/"), config, args.pid)
    else:
        with tempfile.TemporaryDirectory(prefix="load-test-") as data_dir:
            log = Path(data_dir) / "server.log"
            adapters_dir = Path(data_dir) / "adapters"
            if args.adapters:
                print(f"Making {args.adapters} LoRA adapters ...", file=sys.stderr)
                config.adapters = make_adapters(adapters_dir, args.adapters, args.seed)
            server = ServerSupervisor(
                Path(data_dir),
                log,
                MAX_STREAMS_PER_CLIENT=str(2 * args.clients + 8),
                ADAPTERS_DIR=str(adapters_dir),
            )
            try:
                print(f"Starting the server at {server.url} ...", file=sys.stderr)
                try:
                    server.start()
                except RuntimeError as exc:
                    tail = log.read_text(errors="replace")[-3000:]
                    print(f"Error: {exc}. Its output:\n{tail}", file=sys.stderr)
                    return 2
                print(f"Loading it with {args.clients} clients ...", file=sys.stderr)
                report = run_load(server.url, config, supervisor=server, disruptions=disruptions)
            finally:
                server.stop()
            report["server_log_errors"] = server_log_errors(log.read_text(errors="replace"))
            # Kept beside the report: an error line is only useful with its traceback.
            args.output.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, args.output.with_name("server.log"))
            print(f"Server log: {args.output.with_name('server.log')}", file=sys.stderr)
    print(format_report(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"Report: {args.output}", file=sys.stderr)
    growth = report["memory_mb"]["growth"]
    failed = report["errors"] or report.get("server_log_errors")
    if growth is not None and growth > args.max_growth_mb:
        print(f"Memory grew {growth:.0f} MB, over {args.max_growth_mb:.0f} MB", file=sys.stderr)
        failed = True
    peak = report["memory_mb"]["last_server_peak"]
    if args.max_rss_mb is not None and peak is not None and peak > args.max_rss_mb:
        print(f"Memory peaked at {peak:.0f} MB, over {args.max_rss_mb:.0f} MB", file=sys.stderr)
        failed = True
    plot_memory(report, args.output.with_name("memory.png"))
    return 1 if failed else 0


def make_adapters(adapters_dir: Path, count: int, seed: int) -> list[str]:
    from src.benchmarks.adapters import make_random_adapters
    from src.config import load_settings
    from src.models.loader import ensure_bundled_model

    base = ensure_bundled_model(Path(load_settings().model_cache_dir))
    return make_random_adapters(base, adapters_dir, count, seed)


def plot_memory(report: dict, path: Path) -> None:
    """The server's resident memory over the run, one line per server process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["memory_mb"]["timeline"]
    if not timeline:
        return
    figure, axes = plt.subplots(figsize=(8, 3.5))
    for number, pid in enumerate(dict.fromkeys(pid for _, pid, _ in timeline)):
        points = [(t / 60, mb) for t, p, mb in timeline if p == pid]
        axes.plot(*zip(*points, strict=True), label=f"server process {number + 1}")
    for disruption in report.get("disruptions", []):
        axes.axvline(disruption["at"] / 60, color="grey", linestyle=":")
        axes.text(disruption["at"] / 60, axes.get_ylim()[1], disruption["signal"], fontsize=8)
    axes.set_xlabel("minutes into the load")
    axes.set_ylabel("resident memory (MB)")
    axes.set_title("Server memory under load (scripts/load_test.py)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"Memory plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
