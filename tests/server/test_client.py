"""`peftserve adapters upload|list|show|delete` against a live server."""

from __future__ import annotations

import json
import tarfile

from server.cli import main
from tests.adapter_factory import make_peft_adapter
from tests.conftest import LiveServer, tiny_settings


def run(capsys, *args) -> tuple[int, dict | str]:
    code = main(["adapters", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


def test_adapters_commands(tmp_path, tiny_model_dir, tiny_model, capsys):
    folder = make_peft_adapter(tiny_model_dir, "lora", tmp_path / "lora")
    archive = tmp_path / "lora.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for p in folder.glob("adapter*"):
            tar.add(p, p.name)
    settings = tiny_settings(tiny_model_dir, store=tmp_path / "store", admin_key="k")
    with LiveServer(settings, tiny_model) as live:
        conn = ["--url", live.url, "--admin-key", "k"]
        code, meta = run(capsys, "upload", "bot", str(folder), *conn)
        assert code == 0 and meta["version"] == 1 and meta["peft_type"] == "LORA"
        code, meta = run(capsys, "upload", "bot", str(archive), *conn)
        assert code == 0 and meta["version"] == 2
        code, listed = run(capsys, "list", *conn)
        assert [(a["name"], a["versions"]) for a in listed["data"]] == [("bot", [1, 2])]
        code, shown = run(capsys, "show", "bot", *conn)
        assert [v["version"] for v in shown["history"]] == [1, 2]
        code, err = run(capsys, "upload", "bot", str(folder), "--url", live.url, "--admin-key", "wrong")
        assert code == 1 and "403" in err
        code, err = run(capsys, "upload", "bot", str(tmp_path / "missing"), *conn)
        assert code == 1 and "expected an adapter folder" in err
        code, result = run(capsys, "delete", "bot", *conn)
        assert code == 0 and result == {"name": "bot", "deleted": True}
        code, err = run(capsys, "show", "bot", *conn)
        assert code == 1 and "404" in err
    code, err = run(capsys, "list", "--url", live.url)
    assert code == 1 and "cannot reach" in err
