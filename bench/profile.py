"""py-spy over the server and the bridge while a workload runs, summarized as text.

`py-spy record --format raw` writes collapsed stacks, one line per distinct stack:
`thread;frame;frame;... count`, each frame `function (file:line)`. We keep the CPU samples only
(py-spy leaves idle threads out by default) and count, per process:
- self: samples whose innermost frame is this function (where the time is spent);
- total: samples with this function anywhere on the stack (what it costs with its callees).
`--nonblocking` samples without pausing the process, so the profile barely slows it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
TOP = 25


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    process: str
    samples: int
    top_self: tuple[tuple[str, int], ...]  # (function (file), samples)
    top_total: tuple[tuple[str, int], ...]


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m["file"]
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarize(process: str, raw: str) -> ProfileSummary:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")[1:]]  # the first entry names the thread
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            total_counts[name] += count
    return ProfileSummary(process, samples, tuple(self_counts.most_common(TOP)), tuple(total_counts.most_common(TOP)))


async def record(pid: int, seconds: float, out: Path, native: bool = False) -> str:
    """Samples `pid` for `seconds`; returns the raw collapsed stacks ("" when py-spy fails).
    `native` adds C frames (grpc's Cython and core, uvloop, orjson), which needs py-spy to pause
    the process for each sample, so it perturbs more than the default non-blocking mode."""
    exe = py_spy()
    if exe is None:
        return ""
    mode = ["--native"] if native else ["--nonblocking"]
    proc = await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250",
        *mode, "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        print(f"py-spy failed for pid {pid}: {err.decode(errors='replace').strip()[-300:]}", file=sys.stderr)
        return ""
    return out.read_text(encoding="utf-8", errors="replace")


def to_markdown(summaries: list[ProfileSummary], title: str) -> str:
    lines = [f"## py-spy: {title}", ""]
    for s in summaries:
        lines += [f"### {s.process} ({s.samples} samples)", "", "| self % | function | | total % | function |", "|---:|---|---|---:|---|"]
        for (sf, sc), (tf, tc) in zip(s.top_self, s.top_total, strict=False):
            lines.append(f"| {100 * sc / max(1, s.samples):.1f} | `{sf}` | | {100 * tc / max(1, s.samples):.1f} | `{tf}` |")
        lines.append("")
    return "\n".join(lines)
