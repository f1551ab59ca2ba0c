"""A machine without the browser tests' tools: a plain run says what to install, CI's run fails.

tests/test_phone_page.py needs Debian's chromium, espeak-ng and sox. These run that module in a
pytest of their own with a PATH where espeak-ng and sox can't be found and Chromium's path naming
nothing, once as a developer would (the tests are skipped, and the summary says what to install)
and once as CI does (``CI`` set: the run fails with that sentence).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "Debian's chromium, espeak-ng and sox are not installed: sudo apt-get install chromium espeak-ng sox"


def test_missing_browser_tools_are_named_locally_and_fail_ci(tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # nothing on PATH: espeak-ng and sox are missing, Python is given in full
    bare.mkdir()
    env = {name: value for name, value in os.environ.items() if name not in ("CI", "PYTEST_XDIST_WORKER")}
    env["PATH"] = str(bare)
    env["PHONE_TEST_CHROMIUM"] = str(bare / "chromium")  # not there
    # The browser tests only: the access checks would start a bridge, which takes a while.
    command = [sys.executable, "-m", "pytest", "-n", "0", "tests/test_phone_page.py", "-k", "not token"]
    runs = {
        ci: subprocess.Popen(command, cwd=ROOT, env=env | ({"CI": "1"} if ci else {}),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for ci in (False, True)
    }
    output = {ci: run.communicate(timeout=60)[0] for ci, run in runs.items()}

    local = output[False]
    assert runs[False].returncode == 0, local
    assert "3 skipped" in local and "passed" not in local and "error" not in local, local
    assert "SKIPPED [1] tests/test_phone_page.py" in local and INSTALL in local, local  # -rs in pytest.ini

    ci = output[True]
    assert runs[True].returncode == 1, ci
    assert "3 errors" in ci and "passed" not in ci and "skipped" not in ci, ci
    assert f"{INSTALL} (CI must run this test, not skip it)." in ci, ci
