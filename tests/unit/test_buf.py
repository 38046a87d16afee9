"""The API as a contract (issue 18.2): `buf lint` and `buf breaking` over protos/.

buf comes from npm (`@bufbuild/buf`, a devDependency of clients/node, installed by
`make install-test`); buf.yaml at the root configures both and lists the lint exceptions.

What `buf breaking` compares against ("the previous release"), in this order:

1. `LLMPROXY_BUF_AGAINST=<git ref>` when set: the working tree's proto against that ref's.
2. The newest release tag (`v*`) reachable from HEAD's parent: the working tree's proto
   against the tag's. Cutting a tag is how an intended break (a v2) is accepted.
3. No release tag yet (today): every version of the proto that landed, one against the one
   before it. Each commit on HEAD's first-parent history that changed protos/ is compared
   with its first parent, and the working tree with HEAD. For clients, every commit of main
   was a release: CI ran it and it shipped. This works the same in a fresh clone of main (CI),
   where HEAD is main, and in a branch, whose own proto commits come first in that history.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"
PROTO = ROOT / "protos" / "llmproxy" / "v1" / "llmproxy.proto"


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: make install-test (npm install in clients/node)")
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def git_ok(*args: str) -> str | None:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else None


def extract_protos(ref: str, dest: Path) -> Path | None:
    """protos/ as it was at `ref`, written under `dest` next to today's buf.yaml (so both sides
    are read as the same module with the same rules); `dest`, or None if the ref had no protos/."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "protos"], cwd=ROOT, capture_output=True, timeout=30)
    if archive.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    shutil.copy(ROOT / "buf.yaml", dest / "buf.yaml")
    return dest


def baselines() -> list[tuple[str, str | None]]:
    """(against ref, new ref or None for the working tree) pairs, per the module docstring."""
    if not git_ok("rev-parse", "--git-dir"):
        pytest.skip("not a git checkout: no earlier proto to compare with")
    pinned = os.environ.get("LLMPROXY_BUF_AGAINST")
    if pinned:
        return [(pinned, None)]
    tag = git_ok("describe", "--tags", "--abbrev=0", "--match", "v*", "HEAD^")
    if tag:
        return [(tag, None)]
    pairs: list[tuple[str, str | None]] = [("HEAD", None)]
    for commit in git("log", "--first-parent", "--format=%H", "HEAD", "--", "protos").split():
        parent = git_ok("rev-parse", "--verify", "-q", f"{commit}^1")
        if parent:  # the first commit (or a shallow clone's oldest) has nothing before it
            pairs.append((parent, commit))
    return pairs


def test_lint_passes_with_only_the_listed_exceptions():
    proc = buf("lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_catches_an_undocumented_message(tmp_path):
    """The COMMENTS rules are on: a message without a comment fails (so the lint is not a no-op)."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    target = tmp_path / "protos" / "llmproxy" / "v1"
    target.mkdir(parents=True)
    (target / "llmproxy.proto").write_text(PROTO.read_text() + "\nmessage Undocumented {}\n")
    proc = buf("lint", cwd=tmp_path)
    assert proc.returncode != 0 and "Undocumented" in proc.stdout, proc.stdout + proc.stderr


def test_no_breaking_change_against_the_previous_release(tmp_path):
    pairs = baselines()
    assert pairs
    for i, (against, new) in enumerate(pairs):
        old_dir = extract_protos(against, tmp_path / f"old{i}")
        if old_dir is None:
            continue
        new_dir = ROOT if new is None else extract_protos(new, tmp_path / f"new{i}")
        assert new_dir is not None
        proc = buf("breaking", str(new_dir), "--against", str(old_dir))
        assert proc.returncode == 0, f"protos/ at {new or 'the working tree'} breaks {against}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(("  uint64 ttft_us = 1;", "  uint64 ttft_micros = 1;", "FIELD_SAME_NAME"), id="renamed-field"),
        pytest.param(("  uint32 count = 5;", "  uint64 count = 5;", "FIELD_SAME_TYPE"), id="changed-field-type"),
        pytest.param(("  rpc Stats(StatsRequest) returns (StatsResponse);", "", "RPC_NO_DELETE"), id="removed-rpc"),
    ],
)
def test_breaking_catches_a_change_that_breaks_generated_clients(tmp_path, edit):
    old, new, rule = edit
    text = PROTO.read_text()
    assert old in text
    target = tmp_path / "protos" / "llmproxy" / "v1"
    target.mkdir(parents=True)
    (target / "llmproxy.proto").write_text(text.replace(old, new, 1))
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proc = buf("breaking", str(tmp_path), "--against", str(ROOT), "--error-format", "json")
    assert proc.returncode != 0 and f'"{rule}"' in proc.stdout, f"buf breaking accepted {edit}:\n{proc.stdout}{proc.stderr}"
