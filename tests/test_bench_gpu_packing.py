"""The GPU packing benchmark's small version (issue 25): a small fleet, the same stream three ways, and
the claims its report makes checked (no GPU over budget, best-fit within FFD's bound, ≥ 4× whole GPUs)."""

from bench.gpu_packing import ffd, fleet, measure, stream


def test_gpu_packing_small() -> None:
    r = measure(hosts=2, gpus_per_host=2, offered=200, seed=1)
    assert r["gpus"] == 4 and r["gpus_80"] == 2 and r["whole"] == 4
    assert r["gpus_over_budget"] == 0
    assert r["best_fit"] >= 4 * r["whole"]
    # FFD sees the stream in advance: best-fit's prefix never beats it, nor its placements the smallest-first bound.
    assert r["best_fit_before_refusal"] <= r["ffd_prefix"]
    assert r["best_fit"] <= r["ffd_smallest"]
    assert r["ffd_holds_best_fit_set"]


def test_ffd_packs_what_fits() -> None:
    views = fleet(1, 1)  # one 80 GiB GPU
    gib = 1024**3
    assert ffd(views, [50 * gib, 40 * gib, 30 * gib]) == (2, 1)
    assert len(stream(10, 3)) == 10 and stream(10, 3) == stream(10, 3)
