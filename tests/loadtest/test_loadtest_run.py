"""The headless runner: a 15-second locust run against a real server process (its adapters warmed
first) finishes with zero failures and writes its reports."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run import ServerProcess, adapter_metric_lines, main, server_problems, verdict_line
from loadtest.workload import read_requests


def test_a_fifteen_second_headless_run_has_no_failures(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    results = tmp_path / "results"
    code = main(
        [
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "float32",
            "--adapters",
            "3",
            "--users",
            "4",
            "--duration",
            "15",
            "--min-tokens",
            "4",
            "--max-tokens",
            "24",
            "--results",
            str(results),
            "--warm",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out + (results / "locust.log").read_text()
    assert "OK: every request succeeded" in out
    # Each adapter was loaded once, by the warm-up, and never again: the run itself found them loaded.
    assert "adapters warmed first" in out and "adapter loads 3 (disk 3), 0 evictions" in out

    records = read_requests(results / "locust_requests.csv")
    assert len(records) >= 10 and all(r.ok for r in records)
    assert {r.model for r in records} <= {"lora-00", "lora-01", "lora-02"}
    assert all(4 <= r.output_tokens <= 24 and 0 < r.ttft_ms <= r.e2e_ms for r in records)

    with (results / "locust_stats.csv").open() as file:
        stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(file)}
    # Locust rewrites its CSVs once a second and not once more at the end, so the requests of the
    # last second may miss them; the per-request log has every request that finished.
    chat = sum(int(row["Request Count"]) for (kind, _), row in stats.items() if kind == "chat")
    assert 0 < chat <= len(records)
    assert int(stats[("TTFT", "first token")]["Request Count"]) == chat
    assert all(row["Failure Count"] == "0" for row in stats.values())

    for name in ("summary.png", "summary.txt", "report.html", "server.log", "locust_stats_history.csv"):
        assert (results / name).stat().st_size > 0, name
    assert "Application startup complete" in (results / "server.log").read_text()


def test_bad_flags_stop_the_run_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--min-tokens", "9", "--max-tokens", "3", "--results", str(tmp_path)]) == 2
    assert "--min-tokens" in capsys.readouterr().err
    assert not (tmp_path / "server.log").exists()


def test_the_verdict_fails_on_any_failure_and_on_no_requests():
    assert verdict_line(10, 0, 0).startswith("OK")
    assert verdict_line(10, 1, 1) == "FAILED: 1 of 10 requests failed"
    assert verdict_line(0, 0, 0) == "FAILED: no request finished"
    assert verdict_line(10, 0, 2).startswith("FAILED")
    assert verdict_line(10, 0, 0, server_ok=False) == "FAILED: the server failed during the run"


def test_a_server_that_died_or_logged_a_traceback_is_a_problem(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text("INFO started\nException in thread engine:\nTraceback (most recent call last):\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    problems = server_problems(ServerProcess(process, "http://127.0.0.1:1", log))
    assert problems == [
        "server        exited with code 3 during the run",
        f"server        logged 1 traceback(s); see {log}",
    ]
    log.write_text("INFO started\n")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert server_problems(ServerProcess(alive, "http://127.0.0.1:1", log)) == []
    finally:
        alive.kill()
        alive.wait()


def test_adapter_loads_and_evictions_are_read_from_the_metrics():
    text = (
        "# TYPE peftserve_adapter_loads_total counter\n"
        'peftserve_adapter_loads_total{source="disk"} 32.0\n'
        'peftserve_adapter_loads_total{source="cpu"} 5.0\n'
        "# TYPE peftserve_adapter_evictions_total counter\n"
        "peftserve_adapter_evictions_total 5.0\n"
    )
    assert adapter_metric_lines(text) == ["adapter loads 37 (cpu 5, disk 32), 5 evictions"]
    assert adapter_metric_lines("# TYPE other gauge\nother 1.0\n") == []
