"""Runs one streaming workload over its paths, side by side, with the proxy's CPU per path."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.clients import Path, StreamSpec, run_round
from bench.fake_upstream import model_name
from bench.stats import Comparison, PathSummary, StreamRecord
from bench.system import CpuSnapshot, Rig
from bench.workloads import StreamWorkload


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    workload: StreamWorkload
    reference: str  # the path the others are compared with
    paths: dict[str, PathSummary]
    comparisons: dict[str, Comparison]  # path name -> against the reference
    skipped: str = ""  # why some paths did not run ("" when all did)


def spec_for(workload: StreamWorkload, path: Path) -> StreamSpec:
    if workload.source == "demo":
        return StreamSpec("demo-fast", workload.tokens, stamped=False, timeout_s=workload.timeout_s)
    model = model_name(workload.knobs) if path.name == "direct" else workload.public_model
    return StreamSpec(model, workload.tokens, stamped=True, timeout_s=workload.timeout_s)


async def measure(
    workload: StreamWorkload, paths: Sequence[Path], rig: Rig, skipped: str = "", rigs: Mapping[str, Rig] | None = None
) -> WorkloadResult:
    """Runs `workload.rounds` rounds; each round runs every path once, in a rotated order.
    `rigs` gives a path its own processes (one chain per upstream transport); others use `rig`."""
    records: dict[str, list[StreamRecord]] = {p.name: [] for p in paths}
    wall_s = dict.fromkeys(records, 0.0)
    cpu = {name: CpuSnapshot() for name in records}
    for round_ in range(workload.rounds):
        k = round_ % len(paths)
        for path in (*paths[k:], *paths[:k]):
            started: list[CpuSnapshot] = []
            path_rig = rigs.get(path.name, rig) if rigs else rig
            recs = await run_round(
                path,
                spec_for(workload, path),
                workload.streams,
                lambda: started.append(CpuSnapshot.of(path_rig)),
                workload.arrival_spread_s,
                seed=round_,
            )
            cpu[path.name] += CpuSnapshot.of(path_rig) - started[0]
            records[path.name] += recs
            wall_s[path.name] += (max(r.end_ns for r in recs) - min(r.sent_ns for r in recs)) / 1e9
            failed = sum(not r.ok for r in recs)
            if failed:
                errors = sorted({r.error for r in recs if r.error})
                print(f"  {workload.key} {path.name}: {failed} of {len(recs)} streams failed: {errors}", file=sys.stderr)
    summaries = {
        name: PathSummary.of(recs, wall_s[name], c.server_s, c.bridge_s, c.fake_s, c.client_s)
        for name, recs in records.items()
        if (c := cpu[name]) is not None
    }
    reference = paths[0].name
    comparisons = {
        name: Comparison.of(summary, summaries[reference], reference) for name, summary in summaries.items() if name != reference
    }
    return WorkloadResult(workload, reference, summaries, comparisons, skipped)
