"""The `peftserve` command. Its flags are generated from :class:`server.config.Settings`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

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


def add_settings_arguments(
    parser: argparse.ArgumentParser, sections: Sequence[str] = (), fields: Sequence[str] = ()
) -> None:
    """Add one flag per settings field of the named sections and of the named fields, grouped by section."""
    for section, klass in Settings.sections().items():
        chosen = [(n, i) for n, i in klass.model_fields.items() if section in sections or n in fields]
        if chosen:
            group = parser.add_argument_group(f"{section} settings", (klass.__doc__ or "").strip())
            for name, info in chosen:
                _add_field(group, name, info)


def add_section_arguments(parser: argparse.ArgumentParser, klass: type[BaseSettings], title: str) -> None:
    """Add one flag per field of a settings class outside the tree (deploy/ray has one)."""
    group = parser.add_argument_group(title, (klass.__doc__ or "").strip())
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


def _adapters(args: argparse.Namespace) -> int:
    from server.client import ClientError, RegistryClient

    settings = settings_from_args(args)
    server = settings.server
    client = RegistryClient(settings.client.url, server.admin_key or server.api_key)
    try:
        if args.action == "upload":
            result = client.upload(args.name, args.path)
        elif args.action == "list":
            result = client.list()
        elif args.action == "show":
            result = client.show(args.name)
        else:
            result = client.delete(args.name)
    except ClientError as exc:
        print(f"peftserve adapters {args.action}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from server.adapters.common import AdapterError
    from server.adapters.loader import folder_loader
    from server.base_model import load_base_model
    from server.registry.merge import export_merged

    if args.out.exists() and any(args.out.iterdir()):
        print(f"peftserve merge: {args.out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    logging.basicConfig(
        level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    model = load_base_model(settings.model)
    try:
        adapters = settings.adapters
        load = folder_loader(model, adapters.max_lora_rank, max_copy_bytes=adapters.max_module_copy_bytes)
        weights = load(args.adapter_path)
        export_merged(model, weights, args.out)
    except AdapterError as exc:
        print(f"peftserve merge: {args.adapter_path}: {exc}", file=sys.stderr)
        return 1
    print(f"merged {args.adapter_path} into {model.source}: {args.out}")
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
    add_settings_arguments(serve, sections=("model", "engine", "adapters", "server"))
    serve.set_defaults(handler=_serve)

    adapters = commands.add_parser(
        "adapters",
        help="upload, list, show or delete adapters of a running server",
        description="A thin client over a running server's /v1/adapters API.",
    )
    actions = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    upload = actions.add_parser("upload", help="upload an adapter folder or archive as a new version of NAME")
    upload.add_argument("name", help="adapter name (1-64 of a-z, 0-9, '.', '_', '-')")
    upload.add_argument(
        "path", type=Path, help="adapter folder (adapter_config.json + .safetensors) or .tar.gz/.zip"
    )
    actions.add_parser("list", help="list adapters and their latest versions")
    for action, text in (("show", "show an adapter and all its versions"), ("delete", "delete an adapter")):
        actions.add_parser(action, help=text).add_argument("name", help="adapter name")
    for sub in actions.choices.values():
        add_settings_arguments(sub, sections=("client",), fields=("admin_key", "api_key"))
        sub.set_defaults(handler=_adapters)

    merge = commands.add_parser(
        "merge",
        help="fold an adapter (LoRA, IA3, AdaLoRA, VeRA, OFT) into the base model and save the merged model",
        description="Merge for zero latency: write a full model (safetensors, config, tokenizer) with the "
        "adapter folded into the base weights. Any HF tool loads the result.",
    )
    merge.add_argument(
        "--adapter", dest="adapter_path", type=Path, required=True, help="adapter folder to merge"
    )
    merge.add_argument("--out", type=Path, required=True, help="new folder for the merged model")
    add_settings_arguments(merge, sections=("model",), fields=("max_lora_rank",))
    merge.set_defaults(handler=_merge)
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
