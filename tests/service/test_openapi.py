"""The OpenAPI schema tells the truth: schemathesis fuzzes every operation of a live server.

Every response must be documented (status, content type, body schema), nothing may answer 5xx, and
unsupported methods must say what is allowed. A real job exists so path operations reach the engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from service_helpers import JOB, SCHEDULE, Server

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "unsupported_method,allow_header_conformance")
EXAMPLES_PER_OPERATION = 15  # ~900 cases in about a minute here; raise it for a deeper local run


def test_every_operation_conforms_to_the_schema_and_never_fails(sources_dir: Path, tmp_path: Path) -> None:
    with Server(sources_dir, tmp_path / "state") as server:
        body = {"job_id": "demo", "config": JOB | {"allow_wrap": True}, "schedule": SCHEDULE}
        assert httpx.post(f"{server.url}/v1/jobs", json=body).status_code == 201
        config = tmp_path / "schemathesis.toml"
        config.write_text('[parameters]\n"path.job_id" = "demo"\n')
        st = Path(sys.executable).with_name("st")
        run = subprocess.run(
            [str(st), "--config-file", str(config), "run", f"{server.url}/openapi.json", "--checks", CHECKS,
             "--max-examples", str(EXAMPLES_PER_OPERATION), "--phases", "examples,coverage,fuzzing",
             "--workers", "1", "--seed", "1"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS")},
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
