"""The sources layer stands alone: serving and decoding sources never loads the planner or scipy."""

from __future__ import annotations

import subprocess
import sys


def test_service_and_client_load_sources_without_the_planner() -> None:
    code = (
        "import sys\n"
        "import mixer_service.service.app, mixer_service.service.sources, mixer_service.sources.images\n"
        "import client.images\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('mixer_service.planner', 'scipy')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
