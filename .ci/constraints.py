"""Print constraints.txt: the exact installed version of every package in the dependency closure of
peer-lab[dev] (read from pyproject.toml), as pip's `==` constraints.

Run it in an environment where the tests pass (CI's versions are the ones it prints):

    python .ci/constraints.py > constraints.txt

torch is left out: it is installed first and alone (`pip install torch==2.13.0`, see README), and
its CPU build's local version (+cpu) is not something a constraints file should force.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = {"torch", "peer-lab"}


def closure() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    todo: list[tuple[Requirement, set[str]]] = [(Requirement(r), {"dev"}) for r in project["dependencies"]]
    todo += [(Requirement(r), {"dev"}) for r in optional.get("dev", [])]
    seen: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    while todo:
        req, parent_extras = todo.pop()
        env = default_environment()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in parent_extras | {""}):
            continue
        name = canonicalize_name(req.name)
        if name == "peer-lab":  # peer-lab[kernels,s3] inside [dev]
            for extra in req.extras:
                todo += [(Requirement(r), set(req.extras)) for r in optional.get(extra, [])]
            continue
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed here; install the project first")
        versions[name] = dist.version
        for sub in dist.requires or []:
            todo.append((Requirement(sub), extras))
    return {n: v for n, v in versions.items() if n not in LEFT_OUT}


def main() -> None:
    print("# Exact versions CI tests (the dependency closure of peer-lab[dev], torch installed before).")
    print("# Regenerate after a dependency change, in an environment where the tests pass:")
    print("#     python .ci/constraints.py > constraints.txt")
    for name, version in sorted(closure().items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
