"""pyproject.toml and requirements/*.lock say what the code really needs (issue 17.8).

- every third-party module the product imports (server/, bridge/, clients/python) is declared,
  as a runtime dependency or in an optional extra, and every runtime dependency is imported;
- the lock files pin every declared requirement, with hashes, at versions inside its floor, and
  the test lock repeats the run lock's pins;
- floors that the code relies on are stated (protobuf's field-presence printing option).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "server", ROOT / "bridge", ROOT / "clients" / "python" / "llmproxy_client", ROOT / "llmproxy_cli"]
OWN = {"server", "bridge", "llmproxy", "llmproxy_client", "llmproxy_cli"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(group: str | None) -> dict[str, Requirement]:
    listed = PROJECT["dependencies"] if group is None else PROJECT["optional-dependencies"][group]
    return {canonicalize_name(r.name): r for r in map(Requirement, listed)}


def imported_modules() -> set[str]:
    """Top-level names of every module imported anywhere in the product's code."""
    names: set[str] = set()
    for folder in PRODUCT:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - OWN - set(sys.stdlib_module_names) - {"__future__"}


def distributions(modules: set[str]) -> dict[str, set[str]]:
    """Import name -> the installed distributions that provide it."""
    provided = importlib.metadata.packages_distributions()
    return {m: {canonicalize_name(d) for d in provided.get(m, [])} for m in modules}


def test_every_imported_package_is_declared_and_every_runtime_dependency_is_imported():
    runtime = requirements(None)
    optional = {name for group in ("http2",) for name in requirements(group)}
    by_module = distributions(imported_modules())
    undeclared = {m: d for m, d in by_module.items() if not d & (set(runtime) | optional)}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    used = set().union(*by_module.values())
    unused = set(runtime) - used
    assert not unused, f"runtime dependencies the product never imports: {sorted(unused)}"


def test_build_and_test_tools_are_not_runtime_dependencies():
    runtime = requirements(None)
    assert "grpcio-tools" not in runtime and "grpcio-tools" in requirements("build")
    # grpc_testing drives only synchronous servicers; ours is grpc.aio, tested over real sockets.
    assert all("grpcio-testing" not in requirements(g) for g in (None, "build", "test"))


def test_floors_cover_what_the_code_uses():
    # bridge/server.py prints snapshots with always_print_fields_with_no_presence (protobuf 5.26).
    assert "always_print_fields_with_no_presence" in (ROOT / "bridge" / "server.py").read_text()
    protobuf = requirements(None)["protobuf"]
    assert not protobuf.specifier.contains("5.25.9") and protobuf.specifier.contains("5.26.1")
    # gen/*_pb2_grpc.py refuses a grpcio older than the grpcio-tools that generated it.
    floor = lambda req: min(Version(s.version) for s in req.specifier if s.operator == ">=")  # noqa: E731
    assert floor(requirements(None)["grpcio"]) >= floor(requirements("build")["grpcio-tools"])


def read_lock(name: str) -> dict[str, tuple[Version, int]]:
    """package -> (pinned version, number of hashes) from a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[Version, int]] = {}
    current = None
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", line):
            current = canonicalize_name(m.group(1))
            pins[current] = (Version(m.group(2)), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        elif line and not line.startswith(" "):
            current = None
    return pins


def assert_pinned(pins: dict[str, tuple[Version, int]], required: dict[str, Requirement], lock: str) -> None:
    env = default_environment() | {"sys_platform": "linux", "extra": ""}
    for name, req in required.items():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        assert name in pins, f"{name} is not pinned in requirements/{lock}"
        assert req.specifier.contains(pins[name][0], prereleases=True), f"{lock} pins {name}=={pins[name][0]}, outside {req}"


def test_the_locks_pin_every_requirement_with_hashes_inside_its_floor():
    run, test = read_lock("run.lock"), read_lock("test.lock")
    assert run and test
    assert all(hashes > 0 for _, hashes in run.values()) and all(hashes > 0 for _, hashes in test.values())
    assert_pinned(run, requirements(None) | requirements("build"), "run.lock")
    assert_pinned(test, requirements(None) | requirements("build") | requirements("test"), "test.lock")
    # make install-test installs test.lock over run.lock: the same versions, nothing moved.
    moved = {name: (v, test.get(name, (None,))[0]) for name, (v, _) in run.items() if test.get(name, (None,))[0] != v}
    assert not moved, f"test.lock moves run.lock's pins: {moved}"


def test_the_python_client_declares_exactly_what_it_imports():
    """clients/python/pyproject.toml (`pip install ./clients/python`) lists every third-party
    package llmproxy_client imports and nothing else; the root project's floors agree."""
    client = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(r.name): r for r in map(Requirement, client["dependencies"])}
    names: set[str] = set()
    for path in (ROOT / "clients" / "python" / "llmproxy_client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    modules = names - OWN - set(sys.stdlib_module_names) - {"__future__"}
    imported = set().union(*distributions(modules).values()) | {"protobuf"}  # the generated stubs import it
    assert imported == set(declared), f"imported {sorted(imported)}, declared {sorted(declared)}"
    root = requirements(None)
    for name, req in declared.items():
        assert str(req.specifier) == str(root[name].specifier), f"{name}: client {req}, project {root[name]}"
