"""The benchmark scripts still find what they import from the test tree.

The benchmarks are run on GPU machines lent only at times, never in CI; when a test helper they
import (``tiny_models``, ``ray_nodes``) moves, nothing else notices until a lent machine's time is
spent on an ImportError. This loads every script as the GPU machine does (its own ``sys.path``
set-up, in a fresh interpreter so the test session's path cannot hide a broken one) and resolves
each name it imports from those helpers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "__init__.py")
_HELPER_IMPORT = re.compile(r"^\s*from (tiny_models|tests\.[\w.]+) import \(?([\w, ]+)\)?", re.MULTILINE)

_CHECK = """
import importlib, importlib.util, sys
names = {names!r}
spec = importlib.util.spec_from_file_location("benchmarks." + {stem!r}, {path!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)  # runs the script's own sys.path set-up, not its main()
for helper, wanted in names.items():
    found = importlib.import_module(helper)
    missing = [n for n in wanted if not hasattr(found, n)]
    assert not missing, (helper, missing)
print("resolved", sorted(names))
"""


def test_every_benchmark_resolves_what_it_imports_from_the_test_tree() -> None:
    assert len(SCRIPTS) >= 10
    checked = 0
    for script in SCRIPTS:
        names: dict[str, list[str]] = {}
        for helper, listed in _HELPER_IMPORT.findall(script.read_text()):
            names.setdefault(helper, []).extend(n.strip() for n in listed.split(",") if n.strip())
        if not names:
            continue
        code = _CHECK.format(names=names, stem=script.stem, path=str(script))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{script.name}: {done.stderr[-2000:]}"
        checked += 1
    assert checked >= 6  # the scripts that build tiny models or start local Ray nodes
