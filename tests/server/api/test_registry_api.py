"""The registry over HTTP: uploads, versions, refusals that leave the store as it was, and keys."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.adapter_factory import make_peft_adapter, reference_tokens
from tests.conftest import LiveServer, tiny_settings

ADMIN = "admin-secret"
API = "api-secret"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "lora": make_peft_adapter(tiny_model_dir, "lora", root / "lora", seed=1),
        "lora2": make_peft_adapter(tiny_model_dir, "rslora", root / "lora2", seed=2),
        "ia3": make_peft_adapter(tiny_model_dir, "ia3", root / "ia3", seed=3),
    }


@pytest.fixture
def server(tmp_path, tiny_model_dir, tiny_model):
    settings = tiny_settings(
        tiny_model_dir, store=tmp_path / "store", admin_key=ADMIN, api_key=API, max_adapter_bytes=2_000_000
    )
    with LiveServer(settings, tiny_model) as live:
        live.store_root = tmp_path / "store"
        live.http = httpx.Client(base_url=live.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"})
        yield live


def files_of(folder: Path) -> list:
    return [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.name != "README.md"]


def upload(server, name: str, files) -> httpx.Response:
    return server.http.post("/v1/adapters", data={"name": name}, files=files)


def snapshot(root: Path) -> list[str]:
    """Every file of the store except the (empty) staging area."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".staging" not in p.parts)


def test_upload_list_show_serve(server, sources, tiny_model, tiny_model_dir):
    reply = upload(server, "support", files_of(sources["lora"]))
    assert reply.status_code == 201, reply.text
    meta = reply.json()
    assert meta["name"] == "support" and meta["version"] == 1 and meta["peft_type"] == "LORA"
    assert meta["rank"] == 8 and "q_proj" in meta["target_modules"]
    assert meta["size_bytes"] > 0 and len(meta["sha256"]) == 64 and meta["created"] > 0
    second = upload(server, "support", files_of(sources["ia3"])).json()
    assert second["version"] == 2 and second["peft_type"] == "IA3"
    listed = server.http.get("/v1/adapters").json()["data"]
    assert [(a["name"], a["version"], a["versions"]) for a in listed] == [("support", 2, [1, 2])]
    shown = server.http.get("/v1/adapters/support").json()
    assert [v["version"] for v in shown["history"]] == [1, 2]
    models = [m["id"] for m in server.http.get("/v1/models").json()["data"]]
    assert models == [tiny_model.name, "support"]
    prompt = tiny_model.tokenizer("Tell me").input_ids
    for model, source in (("support", "ia3"), ("support@1", "lora")):
        body = {"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0}
        text = server.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        expected = reference_tokens(tiny_model_dir, sources[source], prompt, 5)
        assert text == tiny_model.tokenizer.decode(expected, skip_special_tokens=True)


def _archive(folder: Path, kind: str, prefix: str = "adapter/") -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as zf:
            for p in folder.glob("adapter*"):
                zf.write(p, prefix + p.name)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for p in folder.glob("adapter*"):
                tar.add(p, prefix + p.name)
    return buffer.getvalue()


@pytest.mark.parametrize("kind, filename", [("tar", "a.tar.gz"), ("tar", "a.tgz"), ("zip", "a.zip")])
def test_archive_uploads(server, sources, kind, filename):
    reply = upload(server, "packed", [("file", (filename, _archive(sources["lora"], kind)))])
    assert reply.status_code == 201, reply.text
    assert reply.json()["peft_type"] == "LORA"


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 2) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info


def _tensors(source: Path, change) -> bytes:
    tensors = load_file(source / "adapter_model.safetensors")
    change(tensors)
    path = source.parent / "changed.safetensors"
    save_file(tensors, path)
    return path.read_bytes()


def _first_a(tensors):
    return next(n for n in tensors if "q_proj.lora_A" in n)


BAD_UPLOADS = {
    "pickle file": (lambda s: [("file", ("adapter_model.bin", b"x"))], 400, "adapter_model.bin"),
    "extra file": (lambda s: [*files_of(s), ("file", ("run.sh", b"rm -rf /"))], 400, "run.sh"),
    "absolute path": (
        lambda s: [("file", ("a.tar.gz", _tar_with(_member("/etc/x.safetensors"), b"ab")))],
        400,
        None,
    ),
    "dot dot": (lambda s: [("file", ("a.tar.gz", _tar_with(_member("../x.safetensors"), b"ab")))], 400, None),
    "symlink": (
        lambda s: [("file", ("a.tar.gz", _tar_with(_member("l.safetensors", tarfile.SYMTYPE))))],
        400,
        None,
    ),
    "device": (
        lambda s: [("file", ("a.tar.gz", _tar_with(_member("d.safetensors", tarfile.CHRTYPE))))],
        400,
        None,
    ),
    "not an archive": (lambda s: [("file", ("a.zip", b"PK not really"))], 400, "a.zip"),
    "bad json": (
        lambda s: [("file", ("adapter_config.json", b"{")), *files_of(s)[1:]],
        400,
        "adapter_config.json",
    ),
    "no config": (lambda s: [("file", ("adapter_model.safetensors", b"x"))], 400, "adapter_config.json"),
    "unsupported kind": (
        lambda s: [
            ("file", ("adapter_config.json", json.dumps({"peft_type": "LOHA"}).encode())),
            *files_of(s)[1:],
        ],
        400,
        "peft_type",
    ),
    "module the base lacks": (
        lambda s: [
            files_of(s)[0],
            (
                "file",
                (
                    "adapter_model.safetensors",
                    _tensors(
                        s,
                        lambda t: t.update(
                            {"base_model.model.model.layers.0.mlp.fc9.lora_A.weight": torch.zeros(8, 64)}
                        ),
                    ),
                ),
            ),
        ],
        400,
        "base_model.model.model.layers.0.mlp.fc9.lora_A.weight",
    ),
    "wrong shape": (
        lambda s: [
            files_of(s)[0],
            (
                "file",
                (
                    "adapter_model.safetensors",
                    _tensors(s, lambda t: t.update({_first_a(t): torch.zeros(8, 32)})),
                ),
            ),
        ],
        400,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    ),
    "nan": (
        lambda s: [
            files_of(s)[0],
            (
                "file",
                ("adapter_model.safetensors", _tensors(s, lambda t: t[_first_a(t)].fill_(float("nan")))),
            ),
        ],
        400,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    ),
    "not safetensors": (
        lambda s: [files_of(s)[0], ("file", ("adapter_model.safetensors", b"junk"))],
        400,
        None,
    ),
    "too large": (
        lambda s: [files_of(s)[0], ("file", ("adapter_model.safetensors", b"0" * 3_000_000))],
        413,
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_refusals_leave_the_store_unchanged(server, sources, case):
    assert upload(server, "keep", files_of(sources["lora"])).status_code == 201
    before = snapshot(server.store_root)
    files, status, param = BAD_UPLOADS[case]
    reply = upload(server, "keep", files(sources["lora"]))
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert snapshot(server.store_root) == before
    assert server.http.get("/v1/adapters/keep").json()["versions"] == [1]


def test_rank_above_the_limit_is_400(tmp_path, tiny_model_dir, tiny_model, sources):
    settings = tiny_settings(tiny_model_dir, store=tmp_path / "s", max_lora_rank=4)
    with LiveServer(settings, tiny_model) as live:
        reply = httpx.post(f"{live.url}/v1/adapters", data={"name": "big"}, files=files_of(sources["lora"]))
        assert reply.status_code == 400 and "rank 8" in reply.json()["error"]["message"]
        assert reply.json()["error"]["param"] == "r"


def test_size_limit_applies_while_streaming(server, sources):
    def body():
        yield b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        yield b'--x\r\nContent-Disposition: form-data; name="file"; '
        yield b'filename="adapter_model.safetensors"\r\n\r\n'
        for _ in range(100):  # 10 MB, five times the limit, with no Content-Length announced
            yield b"0" * 100_000
        yield b"\r\n--x--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=x", "Authorization": f"Bearer {ADMIN}"}
    reply = httpx.post(f"{server.url}/v1/adapters", content=body(), headers=headers, timeout=60)
    assert reply.status_code == 413
    # A declared length over the limit is answered before any of the body is read.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/adapters HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=x\r\n"
            + f"authorization: Bearer {ADMIN}\r\ncontent-length: 50000000\r\n\r\n".encode()
        )
        assert sock.recv(200).startswith(b"HTTP/1.1 413")
    assert snapshot(server.store_root) == []


@pytest.mark.parametrize(
    "form, files, param",
    [({}, [("file", ("adapter_config.json", b"{}"))], "name"), ({"name": "Bad Name!"}, None, "name")],
)
def test_form_errors(server, sources, form, files, param):
    reply = server.http.post("/v1/adapters", data=form, files=files or files_of(sources["lora"]))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_not_multipart_is_400(server):
    assert server.http.post("/v1/adapters", json={"name": "x"}).status_code == 400


def test_keys(server, sources, tiny_model):
    url = server.url
    assert (
        httpx.post(f"{url}/v1/adapters", data={"name": "x"}, files=files_of(sources["lora"])).status_code
        == 401
    )
    wrong = {"Authorization": "Bearer nope"}
    reply = httpx.post(
        f"{url}/v1/adapters", data={"name": "x"}, files=files_of(sources["lora"]), headers=wrong
    )
    assert reply.status_code == 403 and reply.json()["error"]["type"] == "permission_error"
    api = {"Authorization": f"Bearer {API}"}
    assert (
        httpx.post(
            f"{url}/v1/adapters", data={"name": "x"}, files=files_of(sources["lora"]), headers=api
        ).status_code
        == 403
    )
    assert httpx.delete(f"{url}/v1/adapters/x", headers=api).status_code == 403
    body = {"model": tiny_model.name, "prompt": "hi", "max_tokens": 2}
    missing = httpx.post(f"{url}/v1/completions", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{url}/v1/completions", json=body, headers=wrong).status_code == 403
    assert httpx.post(f"{url}/v1/completions", json=body, headers=api).status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200


def test_open_server_warns(tmp_path, tiny_model_dir, tiny_model, caplog):
    with LiveServer(tiny_settings(tiny_model_dir, store=tmp_path), tiny_model):
        pass
    assert "no --admin-key" in caplog.text and "no --api-key" in caplog.text


def test_delete(server, sources, tiny_model):
    upload(server, "gone", files_of(sources["lora"]))
    assert server.http.delete("/v1/adapters/gone").json() == {"name": "gone", "deleted": True}
    assert server.http.delete("/v1/adapters/gone").status_code == 404
    assert server.http.get("/v1/adapters/gone").status_code == 404
    body = {"model": "gone", "prompt": "hi", "max_tokens": 2}
    assert server.http.post("/v1/completions", json=body).status_code == 404
    assert "gone" not in [m["id"] for m in server.http.get("/v1/models").json()["data"]]
    again = upload(server, "gone", files_of(sources["ia3"]))
    assert again.status_code == 201 and again.json()["version"] == 2


def _config(source: Path, **changes) -> tuple:
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(changes)
    return ("file", ("adapter_config.json", json.dumps(config).encode()))


@pytest.mark.parametrize(
    "changes, param",
    [
        ({"r": "eight"}, "r"),
        ({"r": 0}, "r"),
        ({"r": 4}, "r"),  # the tensors have rank 8
        ({"rank_pattern": {"q_proj": 2}}, "r"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"target_modules": ["v_proj"]}, "target_modules"),  # the tensors cover every linear
        ({"target_modules": "(("}, "target_modules"),
        ({"alpha_pattern": {"((": 3}}, "alpha_pattern"),
    ],
)
def test_config_must_agree_with_the_tensors(server, sources, changes, param):
    files = [_config(sources["lora"], **changes), *files_of(sources["lora"])[1:]]
    reply = upload(server, "cfg", files)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert server.http.get("/v1/adapters/cfg").status_code == 404


def test_errors_name_no_server_paths(server, sources):
    weights = (sources["lora"] / "adapter_model.safetensors").read_bytes()
    files = [files_of(sources["lora"])[0], ("file", ("other.safetensors", weights))]
    reply = upload(server, "nopath", files)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "adapter_model.safetensors" in message
    assert str(server.store_root) not in message and ".staging" not in message and "/tmp" not in message


def test_a_zip_written_by_writestr_is_plain_files(server, sources):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for p in sources["lora"].glob("adapter*"):
            zf.writestr(p.name, p.read_bytes())  # no file type in the member's mode
    reply = upload(server, "written", [("file", ("a.zip", buffer.getvalue()))])
    assert reply.status_code == 201, reply.text


def test_a_zip_declaring_too_much_is_refused_before_extraction(server, sources, monkeypatch):
    written = []
    monkeypatch.setattr("server.registry.uploads.save_file", lambda *args: written.append(args))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", (sources["lora"] / "adapter_config.json").read_bytes())
        zf.writestr("adapter_model.safetensors", b"\0" * 3_000_000)  # compresses to a few KB
    reply = upload(server, "bomb", [("file", ("a.zip", buffer.getvalue()))])
    assert reply.status_code == 413
    assert "(2000000 bytes)" in reply.json()["error"]["message"]
    assert written == []
    assert snapshot(server.store_root) == []


def test_the_413_states_the_configured_limit(server):
    def body():
        yield b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        yield b'--x\r\nContent-Disposition: form-data; name="file"; '
        yield b'filename="adapter_model.safetensors"\r\n\r\n'
        for _ in range(30):
            yield b"0" * 100_000
        yield b"\r\n--x--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=x"}
    reply = server.http.post("/v1/adapters", content=body(), headers=headers)
    assert reply.status_code == 413
    assert "(2000000 bytes)" in reply.json()["error"]["message"]


def test_adapters_list_in_pages(server, sources):
    for name in ("c", "a", "b"):
        assert upload(server, name, files_of(sources["ia3"])).status_code == 201
    first = server.http.get("/v1/adapters", params={"limit": 2}).json()
    assert [a["name"] for a in first["data"]] == ["a", "b"] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == ("a", "b")
    rest = server.http.get("/v1/adapters", params={"limit": 2, "after": "b"}).json()
    assert [a["name"] for a in rest["data"]] == ["c"] and not rest["has_more"]
    assert server.http.get("/v1/adapters", params={"limit": 0}).status_code == 400
    models = server.http.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in models["data"]][1:] == ["a"] and models["has_more"]
    tail = server.http.get("/v1/models", params={"after": "a"}).json()
    assert [m["id"] for m in tail["data"]] == ["b", "c"] and not tail["has_more"]
    assert len(server.http.get("/v1/models").json()["data"]) == 4


def test_store_gauges(server, sources):
    upload(server, "g", files_of(sources["ia3"]))
    text = server.http.get("/metrics").text
    assert "peftserve_store_adapters 1.0" in text and "peftserve_store_versions 1.0" in text
    index_bytes = next(line for line in text.splitlines() if line.startswith("peftserve_store_index_bytes"))
    assert float(index_bytes.split()[1]) > 0
