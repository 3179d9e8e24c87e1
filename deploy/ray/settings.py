"""The Ray Serve launcher's own settings; the server's settings come from `server.config`.

Like the server's, each field is read from the environment as ``PEFTSERVE_<FIELD>`` and from the
command line as ``--<field>``.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RaySettings(BaseSettings):
    """How the engine replicas are placed, scaled and routed to by Ray Serve."""

    model_config = SettingsConfigDict(
        env_prefix="PEFTSERVE_", use_attribute_docstrings=True, extra="forbid", validate_default=True
    )

    ray_address: str | None = None
    """Ray cluster to join (auto, or ray://HOST:10001); unset starts a local Ray instance."""

    replicas: int = Field(default=2, ge=1)
    """Engine replicas, each a whole peftserve; the lower bound when --max-replicas autoscales."""

    max_replicas: int | None = Field(default=None, ge=1)
    """Autoscale between --replicas and this many engine replicas, by requests in flight."""

    target_ongoing_requests: int = Field(default=32, ge=1)
    """Requests in flight per replica that the autoscaler aims for."""

    max_ongoing_requests: int | None = Field(default=None, ge=1)
    """Requests one replica takes at once (more wait in Ray's router); default --max-batch-size."""

    replica_cpus: float = Field(default=1.0, ge=0)
    """CPUs Ray reserves for each engine replica (its torch threads follow it)."""

    replica_gpus: float = Field(default=0.0, ge=0)
    """GPUs Ray reserves for each engine replica (1 on a GPU node)."""

    affinity: bool = True
    """Send each adapter's requests to a replica that already holds it (Ray Serve model multiplexing)."""

    app_name: str = "peftserve"
    """Name of the Ray Serve application."""

    @model_validator(mode="after")
    def _bounds(self) -> RaySettings:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}")
        return self
