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
    from src.benchmarks.processes import start_server, stop, wait_until_ready

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
    )
    if args.url:
        report = run_load(args.url.rstrip("/"), config, args.pid)
    else:
        with tempfile.TemporaryDirectory(prefix="load-test-") as data_dir:
            log = Path(data_dir) / "server.log"
            process, url = start_server(
                Path(data_dir),
                log=log,
                MAX_STREAMS_PER_CLIENT=str(2 * args.clients + 8),
            )
            try:
                print(f"Starting the server at {url} ...", file=sys.stderr)
                try:
                    wait_until_ready(url, process)
                except RuntimeError as exc:
                    tail = log.read_text(errors="replace")[-3000:]
                    print(f"Error: {exc}. Its output:\n{tail}", file=sys.stderr)
                    return 2
                print(f"Loading it with {args.clients} clients ...", file=sys.stderr)
                report = run_load(url, config, process.pid)
            finally:
                stop(process)
            report["server_log_errors"] = server_log_errors(log.read_text(errors="replace"))
    print(format_report(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"Report: {args.output}", file=sys.stderr)
    growth = report["memory_mb"]["growth"]
    failed = report["errors"] or report.get("server_log_errors")
    if growth is not None and growth > args.max_growth_mb:
        print(f"Memory grew {growth:.0f} MB, over {args.max_growth_mb:.0f} MB", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
