"""The import contract (setup.cfg, ``[importlinter]``): the device side never imports torch.

A device that only benchmarks, fetches or serves has no torch; an import of it (or of the
training, model, quantizer or export code that pulls it in), even inside a function, would
fail there and nowhere on a developer's machine. import-linter checks the whole import
graph, indirect chains and lazy imports included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rtfq_deploy

ROOT = Path(rtfq_deploy.__file__).resolve().parent.parent  # the tree under test (PYTHONPATH), not the install
LINT = shutil.which("lint-imports", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under ``root`` with ``root``'s setup.cfg (no cache written)."""
    assert LINT is not None, "import-linter is not installed: pip install -c constraints.txt -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache", str(root / "setup.cfg")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_device_side_keeps_the_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module,line,needle", [
    ("manifest.py", "import torch\n", "rtfq_deploy.manifest is not allowed to import torch"),
    # inside a function: still an import on a device that runs that path
    ("fetch.py", "def _host_only():\n    from rtfq_deploy.train import loop\n",
     "rtfq_deploy.fetch is not allowed to import rtfq_deploy.train"),
    # indirectly: the models pull torch in
    ("serve/store.py", "from rtfq_deploy.models import ARCHS\n", "rtfq_deploy.serve is not allowed to import"),
])
def test_the_contract_catches_a_violation(tmp_path, module, line, needle):
    shutil.copytree(ROOT / "rtfq_deploy", tmp_path / "rtfq_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    path = tmp_path / "rtfq_deploy" / module
    path.write_text(path.read_text() + "\n\n" + line)
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert needle in result.stdout and "0 kept, 1 broken" in result.stdout
