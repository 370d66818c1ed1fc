"""A spec's secrets (hub.services.secrets, hub.schemas): names that are environment variable names, values
bound to their service and names, refusals that quote no value."""

from __future__ import annotations

import os

import pytest
from pydantic import SecretStr, ValidationError

from hub.errors import HubKeyMissing, InvalidRequest, SecretsUnavailable
from hub.schemas import MAX_SECRETS, ServicePatch, ServiceSpec
from hub.sealing import Sealer, SealError
from hub.services import secrets

VALUE = "v-" + os.urandom(8).hex()


def _spec(**fields: object) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": "svc", "image": "example", **fields})


def test_secrets_are_write_only_and_named_as_environment_variables() -> None:
    spec = _spec(secrets={"DB_PASSWORD": VALUE, "_x9": ""})
    assert "secrets" not in spec.model_dump() and VALUE not in spec.model_dump_json() and VALUE not in repr(spec)
    assert spec.secrets is not None and spec.secrets["DB_PASSWORD"].get_secret_value() == VALUE
    assert "secrets" not in ServicePatch(secrets={"A": VALUE}).model_dump(exclude_unset=True)
    refusals = [({"9LIVES": VALUE}, "secret_name_invalid"), ({"A-B": VALUE}, "secret_name_invalid"),
                ({VALUE + "-": "x"}, "secret_name_invalid"), ({"A" * 129: VALUE}, "secret_name_invalid"),
                ({"A": VALUE + "\x00"}, "secret_value_invalid"), ({"A": "\ud800" + VALUE}, "secret_value_invalid"),
                ({"A": VALUE * 4000}, "secret_value_invalid"), ({"A": 5}, "secret_value_invalid"),
                ({VALUE: None}, "secret_name_invalid"),
                ({f"N{i}": VALUE for i in range(MAX_SECRETS + 1)}, "too_long")]
    for given, kind in refusals:
        with pytest.raises(ValidationError) as refused:
            _spec(secrets=given)
        [error] = refused.value.errors(include_input=False)
        assert error["type"] == kind, error
        assert VALUE not in str(error) and VALUE not in str(refused.value.errors(include_input=False))


def test_sealed_secrets_open_for_their_service_and_names_only() -> None:
    sealer = Sealer(os.urandom(32))
    given = {"B": SecretStr(VALUE), "A": SecretStr("two")}
    sealed = secrets.seal(sealer, given, "svc-1")
    assert sealed is not None and VALUE not in sealed and sealed.startswith("B,A ")
    assert secrets.names(sealed) == ["B", "A"] and secrets.names(None) == []
    assert secrets.opened(sealer, sealed, "svc-1") == {"B": VALUE, "A": "two"}
    assert secrets.opened(sealer, None, "svc-1") == {}
    assert secrets.same(sealer, sealed, "svc-1", given)
    assert not secrets.same(sealer, sealed, "svc-1", {"B": SecretStr(VALUE)})
    assert not secrets.same(None, sealed, "svc-1", given)  # cannot tell: the change goes on
    assert secrets.seal(sealer, {}, "svc-1") is None and secrets.seal(None, None, "svc-1") is None
    # Another service's row, or the names edited in clear: the seal refuses, and nothing is quoted.
    for service_id, value in (("svc-2", sealed), ("svc-1", "B " + sealed.partition(" ")[2])):
        with pytest.raises(SecretsUnavailable) as refused:
            secrets.opened(sealer, value, service_id)
        assert VALUE not in refused.value.message
    with pytest.raises(SecretsUnavailable, match="no key"):
        secrets.opened(None, sealed, "svc-1")
    with pytest.raises(HubKeyMissing):
        secrets.seal(None, given, "svc-1")
    # A rotation by a hub that has neither key it was sealed under: refused, left as it is.
    with pytest.raises(SealError):
        secrets.reseal(Sealer(os.urandom(32), [os.urandom(32)]), sealed, "svc-1")


def test_rotation_keeps_names_and_values() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed = secrets.seal(Sealer(old), {"A": SecretStr(VALUE)}, "svc-1")
    assert sealed is not None
    during = Sealer(new, [old])
    again = secrets.reseal(during, sealed, "svc-1")
    assert again is not None and again.startswith("A ") and secrets.reseal(during, again, "svc-1") is None
    assert secrets.opened(Sealer(new), again, "svc-1") == {"A": VALUE}


def test_a_secret_named_as_an_env_variable_is_refused() -> None:
    spec = _spec(env={"A": "1"}, resources={"gpu_required": True}, health_check={"port": 5000},
                 cpu_fallback={"image": "example-cpu", "env": {"B": "2"}})
    secrets.check_env(spec, {"C": VALUE})
    for name in ("A", "B"):
        with pytest.raises(InvalidRequest) as refused:
            secrets.check_env(spec, {name: VALUE})
        assert refused.value.code == "SECRETS_ENV_CLASH" and refused.value.details == {"names": [name]}
        assert VALUE not in refused.value.message
    with pytest.raises(InvalidRequest) as refused:
        secrets.check_env(_spec(env={f"E{i}": "x" * 30000 for i in range(4)}), {"C": VALUE * 1000})
    assert refused.value.code == "SECRETS_TOO_LARGE" and VALUE not in refused.value.message
