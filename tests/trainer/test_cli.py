import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import chat_rows, write_jsonl
from trainer.cli import GROUPS, build_parser, main
from trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_every_setting_has_a_flag_with_help():
    assert sorted(n for names in GROUPS.values() for n in names) == sorted(TrainConfig.model_fields)
    text = build_parser().format_help()
    for name, info in TrainConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert info.description


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--method", "prompt", "--r", "4"],
            "--r applies to --method adalora/dora/lora/qlora/vera, not prompt",
        ),
        (["--method", "lora", "--placement", "pfeiffer"], "--placement applies to --method bottleneck"),
        (["--method", "lora", "--epochs", "2", "--max-steps", "5"], "give --epochs or --max-steps, not both"),
        (["--method", "lora", "--val-file", "v.jsonl", "--val-fraction", "0.2"], "not both"),
        (["--method", "lora", "--name", "x"], "--name is only used with --push"),
        (["--method", "lora", "--val-fraction", "1.5"], "--val-fraction: Input should be less than 1"),
    ],
)
def test_bad_flag_combinations_exit_2(flags, message, tmp_path, capsys):
    code = main(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "out"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--data", "d", "--out", "o", "--method", "lorax"])
    assert info.value.code == 2


def test_bad_data_exits_2_with_line_numbers_and_writes_nothing(tiny_base, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    good = json.dumps(chat_rows(1)[0])
    data.write_text(f'{good}\n{good}\n{{"messages": 5}}\n{good}\n')
    out = tmp_path / "out" / "adapter"
    code = main(["--data", str(data), "--method", "lora", "--out", str(out), "--base", str(tiny_base)])
    assert code == 2
    assert f'{data}:3: "messages" must be a non-empty list' in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()


def test_existing_out_needs_overwrite(tiny_base, chat_data, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["--data", str(chat_data), "--method", "ia3", "--out", str(out), "--base", str(tiny_base)])
    assert code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_train_write_card_and_push(tiny_base, tmp_path, registry, monkeypatch, capsys):
    monkeypatch.setenv("PEFTSERVE_ADMIN_KEY", "k")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    val = write_jsonl(tmp_path / "val.jsonl", chat_rows(4))
    out = tmp_path / "shout"
    out.mkdir()  # replaced thanks to --overwrite
    flags = ["--data", str(data), "--val-file", str(val), "--method", "lora", "--out", str(out)]
    flags += ["--base", str(tiny_base), "--max-steps", "6", "--eval-every", "3", "--r", "4", "--overwrite"]
    code = main([*flags, "--push", registry.url, "--name", "shouty"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"
    card = (out / "README.md").read_text()
    assert f"`{tiny_base}`" in card
    assert "| method | `lora` |" in card
    assert hashlib.sha256(data.read_bytes()).hexdigest() in card
    assert "| validation data | `val.jsonl`, 4 examples |" in card
    assert "completed 6 of 6 steps" in card
    assert "| final eval loss | " in card and "| best eval loss | " in card
    assert '"r": 4' in card and '"learning_rate": 0.001' in card and "bottleneck_size" not in card
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    upload = registry.received[-1]
    assert upload["name"] == "shouty" and upload["auth"] == "Bearer k"
    assert upload["files"]["adapter_model.safetensors"][1] == (out / "adapter_model.safetensors").read_bytes()
    assert "pushed to" in capsys.readouterr().out


def test_push_refused_exits_1_and_keeps_the_adapter(tiny_base, chat_data, tmp_path, registry, capsys):
    out = tmp_path / "adapter"
    flags = ["--data", str(chat_data), "--method", "ia3", "--out", str(out), "--base", str(tiny_base)]
    code = main([*flags, "--max-steps", "2", "--push", registry.url, "--name", "taken"])
    assert code == 1
    assert "already has this content" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()


def test_ctrl_c_stops_cleanly_and_keeps_the_best_adapter(tiny_base, chat_data, tmp_path):
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "trainer.cli", "--data", str(chat_data), "--method", "lora"]
    command += ["--out", str(out), "--base", str(tiny_base), "--max-steps", "100000", "--eval-every", "2"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "eval loss" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    log = "".join(seen) + rest
    assert proc.returncode == 130, log
    assert "Ctrl-C: stopping after this step" in log
    card = (out / "README.md").read_text()
    assert "interrupted (Ctrl-C) at step" in card and "of 100000" in card
    assert (out / "adapter_model.safetensors").is_file()
