"""The README documents every public setting."""

from __future__ import annotations

from pathlib import Path

from server.config import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert "make serve" in first_block and "make test" in first_block


def test_readme_documents_every_flag():
    missing = [name for name in Settings.fields() if f"`--{name.replace('_', '-')}`" not in README]
    assert not missing, f"README lacks flags: {missing}"


def test_readme_lists_every_refused_field():
    from server.api.schemas import UNSUPPORTED, UNSUPPORTED_ON

    refused = set(UNSUPPORTED) | {f for fields in UNSUPPORTED_ON.values() for f in fields}
    missing = sorted(f for f in refused if f"`{f}`" not in README)
    assert not missing, f"README lacks refused fields: {missing}"
