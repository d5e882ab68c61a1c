"""benchmarks/gpu_check.py runs end to end on CPU (--dry-run) and its fp16 overflow check does what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a benchmark script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # A launcher's variables would make Lightning think this process is already one DDP rank.
    for variable in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: some check said NO, still a complete table
    assert "| check | configuration | result | expected | ok |" in proc.stdout, proc.stderr[-3000:]
    assert out.read_text() in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| (")]
    # Every section ran to its rows: none crashed into an error row.
    assert {row.split("|")[1].strip()[:3] for row in rows} == {"(a)", "(b)", "(c)", "(d)"}, proc.stdout
    assert "**error**" not in proc.stdout, proc.stderr[-3000:]
    overflow = [row for row in rows if row.startswith("| (b) fp16 overflow")]
    assert len(overflow) == 2
    for row in overflow:
        match = re.search(r"skipped (\d+) of (\d+) overflowed", row)
        assert match is not None, row
        skipped, overflowed = int(match[1]), int(match[2])
        assert skipped > 0 and skipped == overflowed, row
        assert row.rstrip(" |").endswith("yes"), row  # B_simple within tolerance of the fp32 run
    assert "skipped (CPU: no sync debug mode)" in proc.stdout
