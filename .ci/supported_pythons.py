"""Prints the CPython versions fusedce supports, one a line: the "Programming Language :: Python :: 3.X"
classifiers of pyproject.toml, which must start at requires-python's lower bound. CI builds and tests
a wheel for each, and fails on one it cannot find."""
import re
import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
versions = sorted((c.rsplit(":: ", 1)[1] for c in project["classifiers"] if re.fullmatch(
    r"Programming Language :: Python :: 3\.\d+", c)), key=lambda v: int(v.split(".")[1]))
if project["requires-python"] != f">={versions[0]}":
    raise SystemExit(f"requires-python {project['requires-python']!r} does not start at the lowest classifier "
                     f"{versions[0]}")
print("\n".join(versions))
