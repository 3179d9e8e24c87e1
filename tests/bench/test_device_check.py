"""`make device-check` on a machine without an NVIDIA GPU, and its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import device_check

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    # An empty PATH: no nvidia-smi, whatever this machine has; nothing may be installed or run.
    proc = subprocess.run(
        [sys.executable, "bench/device_check.py", "--venv", str(tmp_path / "venv")],
        cwd=ROOT,
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU" in proc.stdout
    assert not (tmp_path / "venv").exists()


def test_the_table_marks_every_kind_and_dtype_and_fails_on_one_mismatch(tmp_path):
    report = tmp_path / "equality.jsonl"
    rows = [
        {"kind": "lora", "dtype": "bfloat16", "quantize": "none", "equal": True},
        {"kind": "lora", "dtype": "bfloat16", "quantize": "nf4", "equal": True},
        {"kind": "prefix", "dtype": "bfloat16", "quantize": "none", "equal": False},
    ]
    report.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, all_equal = device_check.equality_table(report)
    assert not all_equal
    assert "| kind | bfloat16 | bfloat16 nf4 |" in table
    assert "| prefix | NOT EQUAL | - |" in table and "| lora | equal | equal |" in table
    assert device_check.equality_table(tmp_path / "missing.jsonl")[1] is False
