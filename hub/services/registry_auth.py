"""A service's registry credentials (its spec's ``registry_auth``): sealed when given, opened for a create.

Invariant: the credentials exist in clear only in the request that gives them (until ``seal`` returns) and
in the controller create body ``opened`` makes; the service row holds them sealed under the hub key
(``ServiceModel.registry_auth_sealed``), and no spec, history entry, operation, audit row or log line
holds them at all.
"""

from __future__ import annotations

import json
import logging

from hub.errors import HubKeyMissing
from hub.schemas import RegistryAuthIn
from hub.sealing import Sealer, SealError
from mmanager.wire import RegistryAuth

log = logging.getLogger(__name__)


def seal(sealer: Sealer | None, auth: RegistryAuthIn) -> str:
    """``auth`` sealed for the service's row; ``HubKeyMissing`` (409) without a hub key."""
    if sealer is None:
        raise HubKeyMissing("registry_auth needs a hub key to be stored sealed, and this hub has none: its "
                            "operator sets MMANAGER_HUB_KEY or MMANAGER_HUB_KEY_FILE (docs/CONFIGURATION.md)",
                            {"field": "registry_auth"})
    return sealer.seal(json.dumps({"username": auth.username, "password": auth.password.get_secret_value()}))


def opened(sealer: Sealer | None, sealed: str | None, service_id: str) -> RegistryAuth | None:
    """The credentials for a controller's create; None when there are none, or when this hub cannot open
    them (no key now, or another one): the create goes on without them, which serves every controller that
    has the image already, and a pull the registry then refuses names the image and the registry's answer."""
    if sealed is None:
        return None
    if sealer is None:
        log.warning("service %s has registry credentials, but this hub has no key to open them "
                    "(MMANAGER_HUB_KEY): creating without them", service_id)
        return None
    try:
        return RegistryAuth.model_validate_json(sealer.open(sealed))
    except SealError as exc:
        log.warning("the registry credentials of service %s do not open: %s; creating without them", service_id, exc)
        return None
