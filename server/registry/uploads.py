"""Turning uploaded files or an archive into a staged adapter folder, safely.

Only `adapter_config.json` and `*.safetensors` files are accepted. Archive members are
read one by one and written under their base name: absolute paths, `..`, links, devices
and nested folders are refused, and so is anything whose contents pass the size limit:
first by the sizes the archive declares (a zip's central directory, before anything is
written; a tar header, before its member is), then by the bytes actually written, since
headers can lie.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from server.adapters.common import CONFIG_FILE

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
UNIX = 3  # a zip member's create_system when its external attributes hold a Unix mode
CHUNK = 1 << 20


class UploadError(ValueError):
    """An upload refused before validation; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def allowed_name(filename: str) -> str:
    """The base name an uploaded file is stored under; refuses any other kind of file."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    if name != CONFIG_FILE and not name.endswith(".safetensors"):
        raise UploadError(
            f"{filename}: only adapter_config.json and .safetensors files are accepted "
            "(pickle files such as .bin and .pt are never loaded)",
            param=filename,
        )
    return name


def too_large(limit: int) -> UploadError:
    return UploadError(f"the adapter is larger than --max-adapter-bytes ({limit} bytes)", status=413)


class Budget:
    """Counts bytes written against the upload limit."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            raise too_large(self.limit)

    def expect(self, declared: int) -> None:
        """Refuse, before writing anything, what an archive declares to be over the limit."""
        if self.used + declared > self.limit:
            raise too_large(self.limit)


def save_file(source: BinaryIO, dest: Path, budget: Budget) -> None:
    """Copy one file into the staging folder, refusing duplicates and counting its bytes."""
    if dest.exists():
        raise UploadError(f"{dest.name} was sent twice", param=dest.name)
    with dest.open("wb") as out:
        while chunk := source.read(CHUNK):
            budget.take(len(chunk))
            out.write(chunk)


def _member_path(name: str) -> str:
    """An archive member's file name, refusing paths that could leave the staging folder."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UploadError(f"archive member {name!r} has an unsafe path", param=name)
    if len(path.parts) > 2:
        raise UploadError(f"archive member {name!r} is nested too deep; put the files at the top", param=name)
    return allowed_name(name)


def extract_archive(archive: BinaryIO, filename: str, dest: Path, budget: Budget) -> None:
    """Write the adapter files of an uploaded .tar.gz, .tgz or .zip (a seekable file) into `dest`."""
    try:
        if filename.lower().endswith(".zip"):
            _extract_zip(archive, dest, budget)
        else:
            _extract_tar(archive, dest, budget)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UploadError(f"{filename} is not a readable archive: {exc}", param=filename) from exc


def _extract_tar(archive: BinaryIO, dest: Path, budget: Budget) -> None:
    with tarfile.open(fileobj=archive, mode="r:*") as tar:
        for member in tar:
            if member.isdir():
                continue
            if not member.isfile():
                raise UploadError(f"archive member {member.name!r} is a link or a device", param=member.name)
            budget.expect(member.size)
            source = tar.extractfile(member)
            if source is None:
                raise UploadError(f"archive member {member.name!r} cannot be read", param=member.name)
            save_file(source, dest / _member_path(member.name), budget)


def _extract_zip(archive: BinaryIO, dest: Path, budget: Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = [info for info in zf.infolist() if not info.is_dir()]
        for info in members:
            # Only Unix zips carry a file type; zipfile.writestr leaves it 0 (a plain file).
            kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == UNIX else 0
            if kind and kind != stat.S_IFREG:
                raise UploadError(
                    f"archive member {info.filename!r} is a link or a device", param=info.filename
                )
            _member_path(info.filename)
        budget.expect(sum(info.file_size for info in members))
        for info in members:
            with zf.open(info) as source:
                save_file(source, dest / _member_path(info.filename), budget)


def copy_folder(source: Path, dest: Path, budget: Budget) -> None:
    """Stage the adapter files of a server-side folder (POST /v1/load_lora_adapter's `lora_path`).

    Only adapter_config.json and .safetensors files are taken; anything else a training run
    leaves beside them (README, tokenizer, pickled .bin) is ignored, never read.
    """
    if not source.is_dir():
        raise UploadError(f"no adapter folder at {source}", status=404, param="lora_path")
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.name == CONFIG_FILE or path.name.endswith(".safetensors")):
            budget.expect(path.stat().st_size)
            with path.open("rb") as f:
                save_file(f, dest / path.name, budget)


def check_complete(folder: Path) -> None:
    if not (folder / CONFIG_FILE).is_file():
        raise UploadError("the upload has no adapter_config.json", param=CONFIG_FILE)
    if not any(folder.glob("*.safetensors")):
        raise UploadError("the upload has no .safetensors weights", param="adapter_model.safetensors")
