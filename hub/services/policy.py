"""The spec policy (``mmanager.policy``) as the hub answers it: a refused spec is ``SpecForbidden`` (403),
checked before anything is written (controllers check again), the CPU fallback's image and env by the same
rules. With it, the one rule across a spec's fields that its shape cannot say: a golden-inference probe
needs a health check."""

from __future__ import annotations

from hub.errors import InvalidRequest, SpecForbidden
from hub.schemas import ServiceSpec
from mmanager.policy import PolicyViolation, SpecPolicy, check_environment, check_image, check_spec


def check_policy(policy: SpecPolicy, spec: ServiceSpec) -> None:
    # The probe is sent to the health check's port.
    if spec.probe is not None and spec.health_check is None:
        raise InvalidRequest("a probe is sent to the health check's port: give a health_check with it",
                             {"field": "probe"}, code="PROBE_NEEDS_HEALTH_CHECK")
    try:
        check_spec(policy, image=spec.image, labels=spec.labels, ports=spec.ports,
                   volume_sources=spec.volumes, cap_add=spec.cap_add, environment=spec.env)
        if spec.cpu_fallback is not None:
            # The CPU variant runs its own image (the rest of its container is the main one's, checked above).
            try:
                check_image(policy, spec.cpu_fallback.image)
            except PolicyViolation as exc:
                raise PolicyViolation("cpu_fallback.image", exc.rule, exc.message) from None
            try:
                check_environment(spec.cpu_fallback.env or {})
            except PolicyViolation as exc:
                raise PolicyViolation(f"cpu_fallback.{exc.field}", exc.rule, exc.message) from None
    except PolicyViolation as exc:
        raise SpecForbidden(exc.message, exc.details) from None
