"""`python -m server.analytics.cli --db PATH [--window-s 3600] [--group-by model]`: the request
log's aggregates as a table."""

from __future__ import annotations

import argparse
import sys

from server.analytics.requestlog import GROUPS, RequestLog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmproxy-stats", description=__doc__)
    parser.add_argument("--db", required=True, help="the request log (server --request-log)")
    parser.add_argument("--window-s", type=int, default=3600)
    parser.add_argument("--group-by", choices=sorted(GROUPS), default="model")
    args = parser.parse_args(argv)
    log = RequestLog(args.db)
    try:
        rows = log.stats(args.window_s, args.group_by)
    finally:
        log.close()
    headers = ("name", "streams", "errors", "cancelled", "completion_tokens", "ttft_p50_ms", "ttft_p95_ms", "itl_p95_ms", "ux_score", "cache_hits", "cached_input_tokens")
    table = [headers] + [tuple(_fmt(row[h]) for h in headers) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return 0


def _fmt(value: float | int | str) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
