"""GPU selection and sharing on the pure scheduler: a table of cases (fleet, request -> controller, GPUs,
rejection codes), then the best-fit packing and the index's reserve/release of shares."""

from types import MappingProxyType

import pytest

from hub.scheduler import ControllerView, PlacementRequest, place
from hub.scheduler.placement import GIB, CandidateIndex


def gpu(id: str, *cards: tuple[str, int], used: tuple[str, ...] = (), shared: dict[str, int] | None = None,
        **kw) -> ControllerView:
    """A GPU controller with ``cards`` as (model, GiB of VRAM), indexed 0.."""
    return ControllerView(
        id=id, server_type="gpu", cpu_cores=32.0, memory_total=256 * GIB,
        gpus=tuple(str(i) for i in range(len(cards))), gpu_models=tuple(m for m, _ in cards),
        gpu_memory=tuple(g * GIB for _, g in cards), gpus_used=frozenset(used),
        gpu_shared=MappingProxyType({k: v * GIB for k, v in (shared or {}).items()}), **kw)


A100 = ("NVIDIA A100-SXM4-80GB", 80)
L4 = ("NVIDIA L4", 24)
CPU = ControllerView(id="cpu", cpu_cores=16.0, memory_total=64 * GIB)

# (name, fleet, request, expected controller, expected GPUs, expected {controller: rejection code})
CASES = [
    ("model substring, any case", [gpu("a", L4), gpu("b", A100)], PlacementRequest(gpu_count=1, gpu_model="a100"),
     "b", ("0",), {"a": "GPU_MODEL", "cpu": "SERVER_TYPE"}),
    ("model picks the matching card of a mixed host", [gpu("a", L4, A100)], PlacementRequest(gpu_count=1, gpu_model="A100"),
     "a", ("1",), {"cpu": "SERVER_TYPE"}),
    ("no GPU of the model", [gpu("a", L4)], PlacementRequest(gpu_count=1, gpu_model="H100"),
     None, (), {"a": "GPU_MODEL", "cpu": "SERVER_TYPE"}),
    ("minimum VRAM", [gpu("a", L4), gpu("b", A100)], PlacementRequest(gpu_count=1, gpu_min_memory=40 * GIB),
     "b", ("0",), {"a": "GPU_MEMORY", "cpu": "SERVER_TYPE"}),
    ("model with too little VRAM", [gpu("a", ("NVIDIA A100-PCIE-40GB", 40))],
     PlacementRequest(gpu_count=1, gpu_model="A100", gpu_min_memory=80 * GIB), None, (), {"a": "GPU_MEMORY", "cpu": "SERVER_TYPE"}),
    ("whole ask skips a GPU with shared tenants", [gpu("a", A100, A100, shared={"0": 4})], PlacementRequest(gpu_count=1),
     "a", ("1",), {"cpu": "SERVER_TYPE"}),
    ("whole ask refused where every GPU is shared", [gpu("a", A100, shared={"0": 4})], PlacementRequest(gpu_count=1),
     None, (), {"a": "GPUS", "cpu": "SERVER_TYPE"}),
    ("shared ask never on a GPU held whole", [gpu("a", A100, A100, used=("0",))], PlacementRequest(gpu_memory=8 * GIB),
     "a", ("1",), {"cpu": "SERVER_TYPE"}),
    ("shared ask refused: all held whole", [gpu("a", A100, used=("0",))], PlacementRequest(gpu_memory=8 * GIB),
     None, (), {"a": "NO_SHARED_GPU", "cpu": "SERVER_TYPE"}),
    ("shared ask refused: no budget left", [gpu("a", L4, shared={"0": 20})], PlacementRequest(gpu_memory=8 * GIB),
     None, (), {"a": "NO_SHARED_GPU", "cpu": "SERVER_TYPE"}),
    ("shared ask fits the budget exactly", [gpu("a", L4, shared={"0": 16})], PlacementRequest(gpu_memory=8 * GIB),
     "a", ("0",), {"cpu": "SERVER_TYPE"}),
    ("best fit: the GPU left with the least", [gpu("a", A100, A100, A100, shared={"0": 60, "1": 70})],
     PlacementRequest(gpu_memory=8 * GIB), "a", ("1",), {"cpu": "SERVER_TYPE"}),
    ("best fit across controllers beats load", [gpu("a", A100, shared={"0": 10}), gpu("b", A100, shared={"0": 64}, containers=9)],
     PlacementRequest(gpu_memory=8 * GIB), "b", ("0",), {"cpu": "SERVER_TYPE"}),
    ("best fit prefers a small card to a big empty one", [gpu("a", A100), gpu("b", L4)],
     PlacementRequest(gpu_memory=8 * GIB), "b", ("0",), {"cpu": "SERVER_TYPE"}),
    ("shared ask with a model", [gpu("a", L4, shared={"0": 8}), gpu("b", A100)],
     PlacementRequest(gpu_memory=8 * GIB, gpu_model="A100"), "b", ("0",), {"a": "GPU_MODEL", "cpu": "SERVER_TYPE"}),
    ("priority tier still comes first", [gpu("a", L4, shared={"0": 12}), gpu("b", A100, priority=0)],
     PlacementRequest(gpu_memory=8 * GIB), "b", ("0",), {"cpu": "SERVER_TYPE"}),
    ("a GPU without reported VRAM takes no share", [ControllerView(id="a", server_type="gpu", gpus=("0",))],
     PlacementRequest(gpu_memory=GIB), None, (), {"a": "NO_SHARED_GPU", "cpu": "SERVER_TYPE"}),
]


@pytest.mark.parametrize(("fleet", "request_", "controller", "gpus", "rejected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gpu_placement_table(fleet, request_, controller, gpus, rejected):
    views = [*fleet, CPU]
    for decision in (place(views, request_), CandidateIndex(views).place(request_)):
        assert decision.controller_id == controller
        assert decision.gpu_devices == gpus
        assert decision.gpu_memory == (request_.gpu_memory if controller else 0)
    full = place(views, request_)
    assert {r.controller_id: r.code for r in full.rejections} == rejected


def test_shares_pack_then_open_a_new_gpu_and_release():
    index = CandidateIndex([gpu("a", L4, L4)])
    request = PlacementRequest(gpu_memory=10 * GIB)
    placed = []
    for _ in range(4):
        d = index.place(request)
        assert d.controller_id is not None
        index.reserve(d.controller_id, 0, 0.0, d.gpu_devices, d.gpu_memory)
        placed.append(d.gpu_devices)
    # Two 10 GB budgets fill a 24 GB card before the second is opened.
    assert placed == [("0",), ("0",), ("1",), ("1",)]
    assert not index.place(request).placed
    assert not index.place(PlacementRequest(gpu_count=1)).placed
    index.release("a", 0, 0.0, ("1",), 10 * GIB)
    index.release("a", 0, 0.0, ("1",), 10 * GIB)
    view = index.get("a")
    assert view is not None and dict(view.gpu_shared) == {"0": 20 * GIB}
    assert index.place(PlacementRequest(gpu_count=1)).gpu_devices == ("1",)


def test_whole_reservation_blocks_shares():
    index = CandidateIndex([gpu("a", A100)])
    d = index.place(PlacementRequest(gpu_count=1))
    assert d.controller_id is not None
    index.reserve(d.controller_id, 0, 0.0, d.gpu_devices)
    rejection = index.place(PlacementRequest(gpu_memory=GIB)).rejections
    assert [r.code for r in rejection] == ["NO_SHARED_GPU"]
