"""A service's secrets (its spec's ``secrets``: name -> value): sealed when given, opened into the
environment of the containers a controller creates for it.

Invariant: the values exist in clear only in the request that gives them (until ``seal`` returns), in the
controller create body ``opened`` fills, and for ``same``'s comparison; the service row holds them sealed
under the hub key (``ServiceModel.secrets_sealed``, as ``<names> <sealed>``: the names, comma-separated, in
clear, so that a clash with ``env`` is found without the key), and no spec, history entry, operation, audit
row, log line or answer holds a value. The service id and the names are bound into the seal: a value copied
onto another service, or names edited in the row, do not open.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import SecretStr

from hub.errors import HubKeyMissing, InvalidRequest, SecretsUnavailable, SpecForbidden
from hub.schemas import ServiceSpec
from hub.sealing import Sealer, SealError
from mmanager.policy import PolicyViolation, check_environment, environment_problem


def _associated(service_id: str, names: str) -> bytes:
    return f"secrets\n{service_id}\n{names}".encode()


def _plain(secrets: Mapping[str, SecretStr]) -> dict[str, str]:
    return {name: value.get_secret_value() for name, value in secrets.items()}


def seal(sealer: Sealer | None, secrets: Mapping[str, SecretStr] | None, service_id: str) -> str | None:
    """``secrets`` sealed for the row of service ``service_id`` (None: none, an empty map included);
    ``HubKeyMissing`` (409) without a hub key."""
    if not secrets:
        return None
    if sealer is None:
        raise HubKeyMissing("secrets need a hub key to be stored sealed, and this hub has none: its operator "
                            "sets MMANAGER_HUB_KEY or MMANAGER_HUB_KEY_FILE (docs/CONFIGURATION.md)",
                            {"field": "secrets"})
    names = ",".join(secrets)
    return f"{names} {sealer.seal(json.dumps(_plain(secrets)), _associated(service_id, names))}"


def names(sealed: str | None) -> list[str]:
    """The names of stored secrets (no key needed)."""
    if not sealed:
        return []
    return [name for name in sealed.partition(" ")[0].split(",") if name]


def _open(sealer: Sealer | None, sealed: str, service_id: str) -> dict[str, str]:
    listed, _, body = sealed.partition(" ")
    if sealer is None:
        raise SecretsUnavailable(f"service {service_id} has secrets, and this hub has no key to open them: its "
                                 "operator sets MMANAGER_HUB_KEY (the key they were sealed under)",
                                 {"service_id": service_id})
    try:
        values = json.loads(sealer.open(body, _associated(service_id, listed)))
    except SealError as exc:  # its text names key ids at most, never a value
        raise SecretsUnavailable(f"the secrets of service {service_id} do not open: {exc}; give them again "
                                 "with a PATCH, or set the key they were sealed under as MMANAGER_HUB_KEY_PREVIOUS",
                                 {"service_id": service_id}) from None
    return {str(name): str(value) for name, value in values.items()}


def opened(sealer: Sealer | None, sealed: str | None, service_id: str) -> dict[str, str]:
    """The secrets, for the environment of a controller's create; ``SecretsUnavailable`` (409) when there
    are some and this hub cannot open them: a container is never made without its secrets."""
    return _open(sealer, sealed, service_id) if sealed else {}


def same(sealer: Sealer | None, sealed: str | None, service_id: str,
         given: Mapping[str, SecretStr] | None) -> bool:
    """Whether ``given`` (a PATCH's) is what is stored already, so giving it again changes nothing (an
    ``apply`` sends it with every change). False when that cannot be told (no key): the change goes on."""
    if not given or not sealed:
        return not given and not sealed
    try:
        return list(given) == names(sealed) and _open(sealer, sealed, service_id) == _plain(given)
    except SecretsUnavailable:
        return False


def check_env(spec: ServiceSpec, secrets: Mapping[str, str | SecretStr]) -> None:
    """A secret named as a variable the spec policy keeps to the controller (``NVIDIA_VISIBLE_DEVICES``...)
    is refused as it would be in ``env`` (403 ``SPEC_FORBIDDEN``, before anything is written, not only at
    the controller). A secret named as one of ``env``'s variables (the CPU fallback's too) is refused (422
    ``SECRETS_ENV_CLASH``): which of the two the container would get is no one's guess. So is an environment
    that, with the secrets, is larger than a container's may be (422 ``SECRETS_TOO_LARGE``)."""
    try:
        check_environment({name: "" for name in secrets})
    except PolicyViolation as exc:
        raise SpecForbidden(exc.message, {"field": f"secrets.{exc.field.removeprefix('env.')}",
                                          "rule": exc.rule}) from None
    env = {**spec.env, **(spec.cpu_fallback.env or {} if spec.cpu_fallback else {})}
    clash = sorted(set(secrets) & set(env))
    if clash:
        raise InvalidRequest(f"secret(s) {', '.join(clash)} also named in env: a variable is one or the other",
                             {"names": clash}, code="SECRETS_ENV_CLASH")
    plain = {name: value.get_secret_value() if isinstance(value, SecretStr) else value
             for name, value in secrets.items()}
    problem = environment_problem({**env, **plain})
    if problem:
        raise InvalidRequest(f"the environment with the secrets: {problem}", code="SECRETS_TOO_LARGE")


def reseal(sealer: Sealer, sealed: str, service_id: str) -> str | None:
    """``sealed`` sealed again under the current hub key (a rotation); None when it already is. Raises
    ``SealError`` when it does not open."""
    listed, _, body = sealed.partition(" ")
    again = sealer.reseal(body, _associated(service_id, listed))
    return None if again is None else f"{listed} {again}"
