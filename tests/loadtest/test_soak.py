"""The soak run: a short one against the tiny model, and its verdict on what it saw."""

from __future__ import annotations

import argparse

import pytest

from loadtest.soak import Tally, build_parser, main, report_lines


def args_for(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_verdict_fails_on_a_5xx_a_stall_or_rss_growth():
    args = args_for("--max-rss-growth-mb", "100")
    healthy = Tally()
    healthy.record("ok", latency=0.5)
    assert report_lines(args, healthy, (500.0, 550.0), [])[1]
    assert not report_lines(args, healthy, (500.0, 700.0), [])[1], "RSS grew 200 MiB over a 100 MiB bound"
    assert not report_lines(args, healthy, (500.0, 500.0), ["server        exited with code 1"])[1]
    broken = Tally()
    broken.record("ok", latency=0.5)
    broken.record("failed", why="no answer within 180 s for lora-01 (a stall)")
    lines, ok = report_lines(args, broken, (500.0, 500.0), [])
    assert not ok and any("a stall" in line for line in lines)
    refused = Tally()
    refused.record("ok", latency=0.5)
    refused.record("refused 404")
    assert report_lines(args, refused, (500.0, 500.0), [])[1], "a 4xx (a deleted adapter) is no failure"


@pytest.mark.slow
def test_a_short_soak_on_the_tiny_model_passes(tiny_model_dir, tmp_path):
    code = main(
        [
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "float32",
            "--duration",
            "15",
            "--warmup",
            "3",
            "--users",
            "4",
            "--adapters",
            "6",
            "--disconnect-rate",
            "0.3",
            "--churn-every",
            "1",
            "--request-timeout",
            "60",
            "--server-args",
            "--max-active-adapters 2",
            "--results",
            str(tmp_path),
        ]
    )
    report = (tmp_path / "soak.txt").read_text()
    assert code == 0, report
    assert " ok" in report and "uploads" in report and "deletes" in report and "new versions" in report
    assert "hung up" in report
