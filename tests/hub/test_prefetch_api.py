"""``prefetch`` in the spec, through the API on real PostgreSQL and Docker: taken and shown; changed alone, it
starts no new container (the hub's pre-pull loop reads it); a value that is not a boolean is refused."""

from __future__ import annotations

from examples.images import EXAMPLE_IMAGE
from tests.hub.conftest import Cluster

SPEC = {"name": "pf", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}


async def test_prefetch_is_a_spec_field_that_changes_no_container(cluster: Cluster) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json=SPEC)
    assert r.status_code == 201, r.text
    service = r.json()
    assert "prefetch" not in service["spec"]  # false: left out, as in specs stored before

    r = await cluster.hub.patch(f"/api/services/{service['id']}", json={"prefetch": True})
    assert r.status_code == 200, r.text
    after = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert after["spec"]["prefetch"] is True
    assert (after["container_id"], after["epoch"], after["status"]) == (service["container_id"], 1, "running")
    assert len(cluster.containers(**{"mmanager.service": service["id"]})) == 1

    for bad in ("maybe", [True], None):
        r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "pf2", "prefetch": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR", (bad, r.text)
    assert len(cluster.containers()) == 1
