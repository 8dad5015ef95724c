"""The lock files agree with pyproject.toml: offline, in a second, for CI and `make lock-check`.

Two hashed, pip-installable lock files (written by `make lock`, with uv):

- requirements.lock: [project].dependencies, what the Docker image installs;
- requirements-dev.lock: the same plus every extra (embedded, dev), what `make install` installs.

Both also pin pip and build-system.requires (setuptools): installs build the project with
--no-build-isolation, so nothing unhashed is fetched. The check fails when

- a lock's header does not carry the sha256 of pyproject's dependency tables as they are now
  (any edit to them needs `make lock`);
- a requirement of pyproject is missing from a lock, or pinned outside its specifier;
- a lock entry is not pinned with `==` or has no sha256 hash;
- the two locks pin a package they share at different versions.

`--stamp` writes the header line (the last step of `make lock`); `--installer-requirements`
prints pip and build-system.requires, for `make lock` to lock them too. Both use the standard
library only; the check itself needs `packaging` (a dev dependency).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = "requirements.lock"
DEV_LOCK = "requirements-dev.lock"
STAMP_PREFIX = "# pyproject-deps-sha256: "
STAMP_RE = re.compile(r"^# pyproject-deps-sha256: ([0-9a-f]{64})\s*$", re.MULTILINE)
STAMP_NOTE = (
    "# (of pyproject's build-system.requires, requires-python, dependencies and\n"
    "#  optional-dependencies: .ci/check_lock.py fails when they change without `make lock`)\n"
)
# Installs run `pip install --require-hashes` from the lock, then the project itself with
# --no-build-isolation: pip and the build backend come from the lock as well.
INSTALLER = ["pip"]


def load_pyproject(root: Path) -> dict[str, Any]:
    with (root / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def dependency_tables(pyproject: dict[str, Any]) -> dict[str, Any]:
    project = pyproject.get("project", {})
    return {
        "build-system.requires": pyproject.get("build-system", {}).get("requires", []),
        "project.requires-python": project.get("requires-python"),
        "project.dependencies": project.get("dependencies", []),
        "project.optional-dependencies": project.get("optional-dependencies", {}),
    }


def pyproject_digest(pyproject: dict[str, Any]) -> str:
    """sha256 of the dependency tables: comments and layout of the TOML do not count."""
    canonical = json.dumps(dependency_tables(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def installer_requirements(pyproject: dict[str, Any]) -> list[str]:
    return INSTALLER + list(pyproject.get("build-system", {}).get("requires", []))


def stamp(root: Path) -> None:
    """Write (or replace) the digest line after the generator's header of each lock file."""
    digest = pyproject_digest(load_pyproject(root))
    for name in (RUNTIME_LOCK, DEV_LOCK):
        path = root / name
        text = path.read_text()
        text = STAMP_RE.sub("", text).replace(STAMP_NOTE, "")
        lines = text.splitlines(keepends=True)
        at = 0
        while at < len(lines) and lines[at].startswith("#"):
            at += 1
        lines[at:at] = [f"{STAMP_PREFIX}{digest}\n", STAMP_NOTE]
        path.write_text("".join(lines))


@dataclass
class Lock:
    name: str
    digest: str | None = None
    # canonical name -> the pinned versions (several when markers split a universal lock)
    pins: dict[str, set[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_lock(path: Path) -> Lock:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    lock = Lock(path.name)
    text = path.read_text()
    found = STAMP_RE.search(text)
    lock.digest = found.group(1) if found else None
    # Join the backslash continuations, then drop the comments.
    logical = re.sub(r"\\\n", " ", text)
    for raw in logical.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.startswith("-"):
            lock.problems.append(f"{path.name}: an option line is not expected: {line[:60]}")
            continue
        spec, _, options = line.partition(" --hash=")
        hashes = re.findall(r"--hash=sha256:[0-9a-f]{64}", "--hash=" + options) if options else []
        try:
            req = Requirement(spec.strip())
        except InvalidRequirement as exc:
            lock.problems.append(f"{path.name}: cannot parse {spec.strip()!r}: {exc}")
            continue
        pinned = [s for s in req.specifier if s.operator == "=="]
        if len(pinned) != 1 or len(req.specifier) != 1 or "*" in pinned[0].version:
            lock.problems.append(f"{path.name}: {req.name} is not pinned with == ({spec.strip()})")
            continue
        if not hashes:
            lock.problems.append(f"{path.name}: {req.name} has no sha256 hash")
        lock.pins.setdefault(canonicalize_name(req.name), set()).add(pinned[0].version)
    return lock


def check(root: Path) -> list[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = load_pyproject(root)
    project = pyproject.get("project", {})
    own_name = canonicalize_name(project.get("name", ""))
    digest = pyproject_digest(pyproject)
    runtime_reqs = list(project.get("dependencies", []))
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    wanted = {
        RUNTIME_LOCK: runtime_reqs + installer_requirements(pyproject),
        DEV_LOCK: runtime_reqs
        + [req for reqs in extras.values() for req in reqs]
        + installer_requirements(pyproject),
    }

    problems: list[str] = []
    locks: dict[str, Lock] = {}
    for name, reqs in wanted.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing: run `make lock`")
            continue
        lock = locks[name] = read_lock(path)
        problems += lock.problems
        if lock.digest is None:
            problems.append(f"{name} has no '{STAMP_PREFIX.strip()}' line: run `make lock`")
        elif lock.digest != digest:
            problems.append(
                f"{name} was locked from other dependency tables than pyproject.toml's now "
                f"(sha256 {lock.digest[:12]}…, pyproject {digest[:12]}…): run `make lock`"
            )
        for text in reqs:
            req = Requirement(text)
            key = canonicalize_name(req.name)
            if key == own_name:  # an extra that pulls in another extra of the project
                continue
            versions = lock.pins.get(key)
            if not versions:
                problems.append(f"{name}: {req.name} ({text}) is not in the lock: run `make lock`")
                continue
            outside = sorted(v for v in versions if not req.specifier.contains(v, prereleases=True))
            if outside:
                problems.append(
                    f"{name}: {req.name}=={', '.join(outside)} does not satisfy {text!r}: "
                    "run `make lock`"
                )

    if len(locks) == len(wanted):
        runtime, dev = locks[RUNTIME_LOCK], locks[DEV_LOCK]
        for key in sorted(runtime.pins.keys() & dev.pins.keys()):
            if runtime.pins[key] != dev.pins[key]:
                problems.append(
                    f"{key} is pinned at {sorted(runtime.pins[key])} in {RUNTIME_LOCK} but at "
                    f"{sorted(dev.pins[key])} in {DEV_LOCK}: run `make lock`"
                )
        for key in sorted(runtime.pins.keys() - dev.pins.keys()):
            problems.append(f"{key} is in {RUNTIME_LOCK} but not in {DEV_LOCK}: run `make lock`")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project's folder")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--stamp", action="store_true", help="write the digest into the locks")
    action.add_argument(
        "--installer-requirements",
        action="store_true",
        help="print pip and build-system.requires, one a line",
    )
    args = parser.parse_args(argv)
    root: Path = args.root

    if args.installer_requirements:
        print("\n".join(installer_requirements(load_pyproject(root))))
        return 0
    if args.stamp:
        stamp(root)
        return 0
    problems = check(root)
    for problem in problems:
        print(f"lock check: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"lock check: {RUNTIME_LOCK} and {DEV_LOCK} agree with pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
