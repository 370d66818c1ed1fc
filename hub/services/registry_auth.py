"""A service's registry credentials (its spec's ``registry_auth``): sealed when given, opened for a create.

Invariant: the credentials exist in clear only in the request that gives them (until ``seal`` returns) and
in the controller create body ``opened`` makes; the service row holds them sealed under the hub key
(``ServiceModel.registry_auth_sealed``), and no spec, history entry, operation, audit row or log line
holds them at all. They belong to one service and one registry host (that of the image they were given
with): both are bound into the seal, and they go only to a create whose image names that host.
"""

from __future__ import annotations

import json
import logging

from hub.errors import HubKeyMissing, InvalidRequest
from hub.schemas import RegistryAuthIn
from hub.sealing import Sealer, SealError
from mmanager.wire import RegistryAuth

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
# Docker Hub's other names, as Docker itself folds them.
_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io"})


def registry_host(image: str) -> str:
    """The registry an image reference names, by Docker's rule: its first path component when that has a
    ``.`` or a ``:`` or is ``localhost``; else Docker Hub (``docker.io``)."""
    first, slash, _ = image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        return DOCKER_HUB
    host = first.lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def _associated(service_id: str, host: str) -> bytes:
    return f"registry_auth\n{service_id}\n{host}".encode()


def seal(sealer: Sealer | None, auth: RegistryAuthIn, service_id: str, image: str) -> str:
    """``auth`` sealed for the row of service ``service_id``, for the registry ``image`` names (the host in
    clear before the sealed value: it is no secret, and says where the credentials may go without opening
    them); ``HubKeyMissing`` (409) without a hub key."""
    if sealer is None:
        raise HubKeyMissing("registry_auth needs a hub key to be stored sealed, and this hub has none: its "
                            "operator sets MMANAGER_HUB_KEY or MMANAGER_HUB_KEY_FILE (docs/CONFIGURATION.md)",
                            {"field": "registry_auth"})
    host = registry_host(image)
    value = json.dumps({"username": auth.username, "password": auth.password.get_secret_value()})
    return f"{host} {sealer.seal(value, _associated(service_id, host))}"


def stored_host(sealed: str) -> str | None:
    """The registry host stored credentials are for (None: a value without one, which opens nowhere)."""
    host, space, _ = sealed.partition(" ")
    return host if space else None


def check_host(sealed: str | None, image: str) -> None:
    """A change of image to another registry than the stored credentials' is refused (422
    ``REGISTRY_AUTH_HOST_MISMATCH``): those credentials are not sent there, and the new image's registry
    would get none; the change gives new ones (or ``"registry_auth": null``) with it."""
    if sealed is None:
        return
    stored, wanted = stored_host(sealed), registry_host(image)
    if stored != wanted:
        raise InvalidRequest(
            f"the image {image!r} is on registry {wanted!r}, and the service's registry credentials are for "
            f"{stored!r}: give registry_auth for {wanted!r} with the change (or null to clear them)",
            {"image": image, "registry": wanted, "registry_auth_registry": stored},
            code="REGISTRY_AUTH_HOST_MISMATCH")


def opened(sealer: Sealer | None, sealed: str | None, service_id: str, image: str) -> RegistryAuth | None:
    """The credentials for a controller's create of ``image``; None when there are none, when ``image`` is
    on another registry than theirs (a CPU fallback's image, a rollback's: they are not sent there), or
    when this hub cannot open them (no key now, or another one, or a value that is not theirs): the create
    goes on without them, which serves every controller that has the image already, and a pull the
    registry then refuses names the image and the registry's answer."""
    if sealed is None:
        return None
    host = stored_host(sealed)
    if host is None:
        log.warning("service %s has registry credentials stored without their registry; they go nowhere "
                    "until given again with a PATCH", service_id)
        return None
    if host != registry_host(image):
        log.debug("service %s: its registry credentials are not for the registry of %s; creating without them",
                  service_id, image)
        return None
    if sealer is None:
        log.warning("service %s has registry credentials, but this hub has no key to open them "
                    "(MMANAGER_HUB_KEY): creating without them", service_id)
        return None
    try:
        return RegistryAuth.model_validate_json(sealer.open(sealed.partition(" ")[2], _associated(service_id, host)))
    except SealError as exc:  # its text names key ids at most, never the value
        log.warning("the registry credentials of service %s do not open: %s; creating without them", service_id, exc)
    except Exception:
        # Never this error's text: a validation error quotes its input, and the input is the password.
        log.warning("the registry credentials of service %s open but are not valid credentials; creating "
                    "without them", service_id)
    return None


def reseal(sealer: Sealer, sealed: str, service_id: str) -> str | None:
    """``sealed`` sealed again under the current hub key (a rotation); None when it already is. Raises
    ``SealError`` when it does not open (a value stored without its registry host included)."""
    host = stored_host(sealed)
    if host is None:
        raise SealError("stored without its registry host")
    again = sealer.reseal(sealed.partition(" ")[2], _associated(service_id, host))
    return None if again is None else f"{host} {again}"
