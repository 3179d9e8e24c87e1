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


def run_main_with_doubles(monkeypatch, *args: str) -> tuple[list[list[str]], list[Path]]:
    """main() on a pretend GPU machine: the commands it would run, the interpreters it serves with."""
    ran, served = [], []
    monkeypatch.setattr(device_check, "gpus", lambda: ["GPU 0: a test double"])
    monkeypatch.setattr(device_check, "local_larger_model", lambda: None)
    monkeypatch.setattr(device_check, "run", lambda cmd, what, env=None, timeout=None: ran.append(cmd))
    monkeypatch.setattr(device_check, "serve_and_ask", lambda python, model: served.append(python) or 1.0)
    monkeypatch.setattr(sys, "argv", ["device_check.py", *args])
    assert device_check.main() == 1  # nothing reported equal: the doubles ran no test
    return ran, served


def test_with_python_it_installs_nothing_and_runs_every_step_with_that_interpreter(monkeypatch):
    """A CUDA machine with no network: its own interpreter already holds torch and our needs."""
    ran, served = run_main_with_doubles(monkeypatch, "--python", "/opt/cuda-env/bin/python3")
    # no make install: the tests, then the bench with decode graphs and without
    assert [cmd[0] for cmd in ran] == ["/opt/cuda-env/bin/python3"] * 3
    assert [cmd[cmd.index("--decode-graphs") + 1] for cmd in ran[1:]] == ["on", "off"]
    assert served == [Path("/opt/cuda-env/bin/python3")]


def test_without_python_it_builds_its_venv_with_pytest_first(monkeypatch, tmp_path):
    ran, served = run_main_with_doubles(monkeypatch, "--venv", str(tmp_path / "v"))
    python = tmp_path / "v" / "bin" / "python"
    assert ran[0] == ["make", "install", f"VENV={tmp_path / 'v'}", "TORCH=torch"]
    assert ran[1][:4] == [str(python), "-m", "pip", "install"] and "pytest" in ran[1]
    assert [cmd[0] for cmd in ran[2:]] == [str(python)] * 3 and served == [python]
