"""`python -m deploy.ray`: start peftserve as a Ray Serve application and serve until interrupted.

The server's flags are the ones `peftserve serve` takes (generated from `server.config`), passed
to every engine replica; the Ray flags come from `deploy.ray.settings`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from pydantic import ValidationError

from server.cli import add_section_arguments, add_settings_arguments, settings_from_args

log = logging.getLogger("peftserve.ray")


def build_parser() -> argparse.ArgumentParser:
    from deploy.ray.settings import RaySettings

    parser = argparse.ArgumentParser(
        prog="python -m deploy.ray",
        description="Serve peftserve from N engine replicas behind one OpenAI-compatible Ray Serve "
        "ingress that sends each adapter's requests to a replica already holding it. --host and "
        "--port are where Ray Serve's HTTP proxy listens; the other server flags go to every replica.",
    )
    add_settings_arguments(parser, sections=("model", "engine", "adapters", "server"))
    add_section_arguments(parser, RaySettings, "ray settings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from deploy.ray.settings import RaySettings

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        ray_settings = RaySettings(**{k: v for k, v in vars(args).items() if k in RaySettings.model_fields})
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"]) or "flags"
            print(f"deploy.ray: invalid --{field.replace('_', '-')}: {error['msg']}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from deploy.ray.app import build_app
    from server.api.app import configure_logging

    configure_logging(settings.server.log_level)
    if ray_settings.ray_address is None:
        # A local instance: Ray's own services and the replicas' metrics ports stay on loopback.
        ray.init(_node_ip_address="127.0.0.1")
    else:
        ray.init(address=ray_settings.ray_address)
    serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
    serve.run(build_app(settings, ray_settings), name=ray_settings.app_name, route_prefix="/")
    log.info("peftserve on Ray Serve: http://%s:%d", settings.server.host, settings.server.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("interrupted; shutting the application down")
        serve.delete(ray_settings.app_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
