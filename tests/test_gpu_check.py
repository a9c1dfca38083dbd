"""scripts/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU with tiny sizes and is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow  # about two minutes on 2 cores: four training runs of a U-Net on 32x32 images, Inception features
def test_the_gpu_check_dry_run_runs_every_step_and_records_it(tmp_path: Path) -> None:
    env = {**os.environ, "PY": sys.executable}
    result = subprocess.run([str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["dry_run"] is True
    assert set(steps) == {"environment", "throughput", "end to end", "evaluation throughput", "ddp", "gpu tests"}
    assert all(step["ok"] for step in steps.values()), {k: v.get("error") for k, v in steps.items()}
    rows = {row["mode"]: row for row in steps["throughput"]["rows"]}
    assert all(rows[m]["fmlab_ms"] > 0 and rows[m]["bare_ms"] > 0 for m in ("fp32", "tf32", "bf16-mixed"))
    assert "skipped" in rows["bf16 + channels_last + compile"]  # compile is measured on the GPU only
    assert steps["throughput"]["paper_run_hours"] > 0
    # the killed and resumed run equals the unbroken one (bit for bit on the CPU)
    assert steps["end to end"]["resume_within_tolerance"] is True
    assert set(steps["end to end"]["resume_relative_differences"]) >= {"fid", "bpd", "train_loss"}
    assert steps["evaluation throughput"]["dopri5_nfe"] > 0 and steps["ddp"]["backend"] == "gloo"
    assert "skipped" in steps["gpu tests"]["summary"] or "passed" in steps["gpu tests"]["summary"]
    assert "| fp32 |" in (tmp_path / "gpu_check.md").read_text()
