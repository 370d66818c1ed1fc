"""Settings the hub and the controllers share, under the same environment names on both
sides: the container spec policy (``mmanager.policy``) and TLS (``mmanager.tls``).

Mixins of pydantic-settings classes: ``HubSettings`` and ``ControllerSettings``
inherit them, so one name, one default and one check serve both processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from mmanager.policy import SpecPolicy, comma_list
from mmanager.tls import TlsConfig


class SpecPolicySettings(BaseSettings):
    """The admin's knobs of the spec policy, comma-separated in the environment: image prefixes
    allowed (empty: any image), host folders that may be mounted, host ports below 1024 allowed."""

    # Controllers resolve symlinks of host paths (they see the host's files); the hub cannot.
    RESOLVE_PATHS: ClassVar[bool] = False

    allowed_images: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="MMANAGER_ALLOWED_IMAGES")
    allowed_host_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="MMANAGER_ALLOWED_HOST_PATHS")
    allow_low_ports: Annotated[list[int], NoDecode] = Field(
        default_factory=list, validation_alias="MMANAGER_ALLOW_LOW_PORTS")

    @field_validator("allowed_images", "allowed_host_paths", "allow_low_ports", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("allowed_host_paths")
    @classmethod
    def _absolute_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"MMANAGER_ALLOWED_HOST_PATHS entry {path!r} must be an absolute path without '..'")
        return value

    @property
    def spec_policy(self) -> SpecPolicy:
        # Built on each use: cheap, and never stale when a test or an admin changes a setting.
        return SpecPolicy(
            allowed_images=tuple(self.allowed_images),
            allowed_host_paths=tuple(self.allowed_host_paths),
            allowed_low_ports=frozenset(self.allow_low_ports),
            resolve_paths=self.RESOLVE_PATHS,
        )


class TlsSettings(BaseSettings):
    """Serve HTTPS with cert and key; verify peers against tls_ca (else the system trust store);
    with tls_client_auth, require callers' certificates signed by it (mutual TLS)."""

    tls_cert: Path | None = Field(default=None, validation_alias="MMANAGER_TLS_CERT")
    tls_key: Path | None = Field(default=None, validation_alias="MMANAGER_TLS_KEY")
    tls_ca: Path | None = Field(default=None, validation_alias="MMANAGER_TLS_CA")
    tls_client_auth: bool = Field(default=False, validation_alias="MMANAGER_TLS_CLIENT_AUTH")

    @field_validator("tls_cert", "tls_key", "tls_ca", mode="before")
    @classmethod
    def _blank_path_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_tls(self) -> TlsSettings:
        problem = self.tls.problem()
        if problem:
            raise ValueError(problem)
        return self

    @property
    def tls(self) -> TlsConfig:
        return TlsConfig(self.tls_cert, self.tls_key, self.tls_ca, self.tls_client_auth)
