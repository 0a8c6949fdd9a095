"""The OpenAPI schema tells the truth: schemathesis generates requests from
``/openapi.json`` (valid and invalid ones, a few hundred) against a real server on
``random:tiny``; no answer is a 5xx, no schema-valid request is refused, no
schema-violating one accepted, and every answer matches its documented status, content
type and schema. A few minutes: ``pytest -m slow tests/test_schema.py`` (CI runs it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("torch")

from riffusion_engine.engine.serve.app import background, create_app
from riffusion_engine.engine.serve.config import ServerConfig

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_mismatch(torch_engine, tmp_path: Path) -> None:
    app = create_app(torch_engine, ServerConfig(max_steps=1, batch_window_ms=0))
    command = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    with background(app) as url:
        result = subprocess.run(
            [command, "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "100",
             "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert "No issues found" in result.stdout
