"""The spec policy (``mmanager.policy``) as the hub answers it: a refused spec is ``SpecForbidden`` (403),
checked before anything is written (controllers check again). With it, the one rule across a spec's fields
that its shape cannot say: a golden-inference probe needs a health check."""

from __future__ import annotations

from hub.errors import InvalidRequest, SpecForbidden
from hub.schemas import ServiceSpec
from mmanager.policy import PolicyViolation, SpecPolicy, check_spec


def check_policy(policy: SpecPolicy, spec: ServiceSpec) -> None:
    # The probe is sent to the health check's port.
    if spec.probe is not None and spec.health_check is None:
        raise InvalidRequest("a probe is sent to the health check's port: give a health_check with it",
                             {"field": "probe"}, code="PROBE_NEEDS_HEALTH_CHECK")
    try:
        check_spec(policy, image=spec.image, labels=spec.labels, ports=spec.ports,
                   volume_sources=spec.volumes, cap_add=spec.cap_add, environment=spec.env)
    except PolicyViolation as exc:
        raise SpecForbidden(exc.message, exc.details) from None
