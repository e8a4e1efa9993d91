"""conftest's require(): a missing optional part fails a test under CI and skips it elsewhere.

Each case runs pytest in a subprocess on a generated test file, so the CI variable is set or unset
exactly as `.ci/run` and a developer's shell would have it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

MISSING_MODULE = "a_module_that_does_not_exist_xyz"
MISSING_BINARY = "a-binary-that-does-not-exist-xyz"


def run_generated_test(tmp_path, body: str, ci: bool) -> subprocess.CompletedProcess:
    """pytest on one generated test file that imports tests/conftest.py's require; CI "true" or unset."""
    (tmp_path / "test_generated.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom conftest import require\n\n\n"
        f"def test_it():\n{body}")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    # -p no:cacheprovider: nothing written beside the generated file; rootdir is tmp_path, not the repo
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_generated.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("body, name", [
    (f"    require({MISSING_MODULE!r})\n", MISSING_MODULE),
    (f"    require({MISSING_BINARY!r}, binary=True, why='a test of the helper')\n", MISSING_BINARY),
], ids=["module", "binary"])
def test_missing_part_fails_under_ci_and_skips_elsewhere(tmp_path, body, name):
    ci = run_generated_test(tmp_path, body, ci=True)
    assert ci.returncode != 0 and "1 failed" in ci.stdout, ci.stdout + ci.stderr
    assert name in ci.stdout and "under CI this is a failure" in ci.stdout, ci.stdout

    local = run_generated_test(tmp_path, body, ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    assert f"{name} is missing" in local.stdout, local.stdout


def test_present_parts_are_returned_under_ci(tmp_path):
    """The other side: what is there comes back (the module, the binary's path) and the test passes."""
    sh = shutil.which("sh")
    body = ("    import json\n"
            "    assert require('json') is json\n"
            f"    assert require('sh', binary=True) == {sh!r}\n")
    proc = run_generated_test(tmp_path, body, ci=True)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
