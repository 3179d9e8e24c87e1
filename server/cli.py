"""The `peftserve` command. Its flags are generated from :class:`server.config.Settings`."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from server.config import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _add_field(group: argparse._ArgumentGroup, name: str, info: FieldInfo) -> None:
    annotation = _unwrap_optional(info.annotation)
    default = info.get_default(call_default_factory=True)
    shown = "unset" if default is None else str(default)
    help_text = f"{info.description} (default: {shown}; env PEFTSERVE_{name.upper()})"
    kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": name}
    origin = typing.get_origin(annotation)
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif origin is list:
        kwargs["action"] = "append"
        kwargs["metavar"] = name.upper()
    else:
        kwargs["metavar"] = {int: "N", Path: "DIR"}.get(annotation, name.upper())
    group.add_argument(_flag(name), **kwargs)


def add_settings_arguments(parser: argparse.ArgumentParser, sections: Sequence[str] | None = None) -> None:
    """Add one flag per settings field (of the named sections, or all), grouped by section."""
    for section, klass in Settings.sections().items():
        if sections is not None and section not in sections:
            continue
        group = parser.add_argument_group(f"{section} settings", (klass.__doc__ or "").strip())
        for name, info in klass.model_fields.items():
            _add_field(group, name, info)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags that were given on top."""
    leaves = Settings.fields()
    return Settings.load({k: v for k, v in vars(args).items() if k in leaves})


def _serve(args: argparse.Namespace) -> int:
    from server.api.app import run_server

    run_server(settings_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftserve",
        description="Serve one base language model and many PEFT adapters over an OpenAI-compatible API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="start the HTTP server",
        description="Load the base model and serve it over an OpenAI-compatible HTTP API.",
    )
    add_settings_arguments(serve)
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            print(f"peftserve: invalid {_flag(field)}: {error['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("peftserve").info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
