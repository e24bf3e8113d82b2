"""Print the oldest versions pyproject.toml declares: each ``NAME>=X`` of the dependencies and
extras as ``NAME==X`` (markers kept), one per line, for ``pip install`` in CI's oldest run."""

import re
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
oldest = {}
for requirement in requirements:
    match = re.match(r"^([A-Za-z0-9_.-]+)[^;]*?>=\s*([^,;\s]+)[^;]*(;.*)?$", requirement)
    if match:
        name, version, marker = match.groups()
        oldest[name.lower()] = f"{name}=={version}{marker or ''}"
print("\n".join(oldest.values()))
