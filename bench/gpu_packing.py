"""GPU packing: services placed from a lab's mix of models on a simulated fleet, whole GPUs against shared.

No hub: the pure scheduler (``hub.scheduler.placement``) on a fleet of ``gpu`` controllers, half with 80 GiB
GPUs and half with 24 GiB ones. A stream of services, each a model needing 2–16 GiB of VRAM drawn from a
lab's mix (seeded), is offered one after another, more than the fleet can hold; each is placed the moment
it comes, as a create would be, and a refused one is skipped. Three ways, on the same stream:

- **whole GPUs**: each service asks for one GPU (``gpu_count=1``), as before issue 25;
- **shared, best-fit**: each asks for its VRAM as a budget (``gpu_memory``), through ``CandidateIndex``
  (placed online, in arrival order, each reserved before the next);
- **first-fit decreasing** (offline, seeing the stream in advance): the longest prefix of the stream
  that FFD (largest first, each to the first GPU with room) packs whole, the bound for best-fit's
  services placed before its first refusal (the same mix); and, choosing which services to take, the
  most of the smallest ones FFD packs, the bound for the services placed in all (a changed mix).

Then the check: no GPU's committed budget above its VRAM, and (for the services best-fit placed) how many
GPUs FFD needs to hold exactly them, against how many best-fit opened.

    python -m bench.gpu_packing [--hosts 8] [--gpus-per-host 4] [--offered 1500] [--seed 25] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from hub.scheduler.placement import GIB, CandidateIndex, ControllerView, PlacementRequest

# A lab's models and the VRAM each needs to serve, in GiB, with how often each is deployed.
MIX: tuple[tuple[str, int, int], ...] = (
    ("DNABERT-2 117M", 2, 20),
    ("ESM-2 650M", 4, 20),
    ("Nucleotide Transformer 500M", 4, 15),
    ("HyenaDNA large", 6, 10),
    ("scGPT", 8, 12),
    ("ESM-2 3B", 12, 10),
    ("Evo 7B (8-bit)", 16, 8),
    ("Geneformer + adapters", 3, 5),
)
BIG, SMALL = ("NVIDIA A100-SXM4-80GB", 80), ("NVIDIA L4", 24)


def fleet(hosts: int, gpus_per_host: int) -> list[ControllerView]:
    """``hosts`` GPU controllers, the first half with 80 GiB GPUs, the rest with 24 GiB ones."""
    views = []
    for h in range(hosts):
        model, gib = BIG if h < (hosts + 1) // 2 else SMALL
        views.append(ControllerView(
            id=f"gpu-{h:03d}", server_type="gpu", max_containers=10_000, cpu_cores=64.0, memory_total=512 * GIB,
            gpus=tuple(str(i) for i in range(gpus_per_host)), gpu_models=(model,) * gpus_per_host,
            gpu_memory=(gib * GIB,) * gpus_per_host))
    return views


def stream(offered: int, seed: int) -> list[int]:
    """The VRAM (bytes) of each offered service, in arrival order."""
    rng = random.Random(seed)
    sizes = rng.choices([gib for _, gib, _ in MIX], weights=[w for _, _, w in MIX], k=offered)
    return [gib * GIB for gib in sizes]


def whole(views: list[ControllerView], items: list[int]) -> int:
    index = CandidateIndex(views)
    placed = 0
    for _ in items:
        d = index.place(PlacementRequest(gpu_count=1))
        if d.placed:
            assert d.controller_id is not None
            index.reserve(d.controller_id, 0, 0.0, d.gpu_devices)
            placed += 1
    return placed


def best_fit(views: list[ControllerView], items: list[int]) -> tuple[list[int], int, dict[tuple[str, str], int], float]:
    """The items placed, how many came before the first refusal, the budget committed per (controller, GPU),
    and the seconds per placement."""
    index = CandidateIndex(views)
    accepted: list[int] = []
    first_refusal = len(items)
    started = time.perf_counter()
    for n, size in enumerate(items):
        d = index.place(PlacementRequest(gpu_memory=size))
        if d.placed:
            assert d.controller_id is not None
            index.reserve(d.controller_id, 0, 0.0, d.gpu_devices, d.gpu_memory)
            accepted.append(size)
        else:
            first_refusal = min(first_refusal, n)
    per = (time.perf_counter() - started) / max(len(items), 1)
    committed = {(v.id, g): b for v in index.views() for g, b in v.gpu_shared.items()}
    return accepted, first_refusal, committed, per


def bins(views: list[ControllerView]) -> list[tuple[tuple[str, str], int]]:
    return [((v.id, g), v.gpu_total(i)) for v in views for i, g in enumerate(v.gpus)]


def ffd(views: list[ControllerView], items: list[int]) -> tuple[int, int]:
    """First-fit decreasing, offline: (items placed, GPUs opened)."""
    capacity = bins(views)
    left = [cap for _, cap in capacity]
    placed = 0
    for size in sorted(items, reverse=True):
        for i, room in enumerate(left):
            if room >= size:
                left[i] -= size
                placed += 1
                break
    opened = sum(1 for i, room in enumerate(left) if room < capacity[i][1])
    return placed, opened


def ffd_most(views: list[ControllerView], items: list[int], smallest_first: bool) -> int:
    """The largest k such that FFD packs all of the first k items (of the stream, or of the smallest)."""
    pool = sorted(items) if smallest_first else items
    lo, hi = 0, len(pool)
    while lo < hi:
        k = (lo + hi + 1) // 2
        if ffd(views, pool[:k])[0] == k:
            lo = k
        else:
            hi = k - 1
    return lo


def measure(hosts: int, gpus_per_host: int, offered: int, seed: int) -> dict[str, Any]:
    views = fleet(hosts, gpus_per_host)
    items = stream(offered, seed)
    capacity = dict(bins(views))
    n_whole = whole(views, items)
    accepted, first_refusal, committed, per = best_fit(views, items)
    over = [k for k, b in committed.items() if b > capacity[k]]
    n_ffd = ffd_most(views, items, smallest_first=False)
    n_ffd_small = ffd_most(views, items, smallest_first=True)
    ffd_all, ffd_opened = ffd(views, accepted)
    free_big = sum(1 for k, cap in capacity.items() if cap == BIG[1] * GIB and k not in committed)
    return {
        "hosts": hosts, "gpus": len(capacity), "gpus_80": sum(1 for c in capacity.values() if c == BIG[1] * GIB),
        "fleet_vram_gib": sum(capacity.values()) // GIB, "offered": offered,
        "offered_vram_gib": sum(items) // GIB, "seed": seed,
        "whole": n_whole, "best_fit": len(accepted), "best_fit_before_refusal": first_refusal,
        "ffd_prefix": n_ffd, "ffd_smallest": n_ffd_small,
        "ratio_to_whole": len(accepted) / n_whole if n_whole else 0.0,
        "prefix_to_ffd": first_refusal / n_ffd if n_ffd else 0.0,
        "ratio_to_ffd_smallest": len(accepted) / n_ffd_small if n_ffd_small else 0.0,
        "best_fit_vram_used": sum(committed.values()) / sum(capacity.values()),
        "best_fit_gpus_opened": len(committed), "ffd_gpus_for_best_fit_set": ffd_opened,
        "ffd_holds_best_fit_set": ffd_all == len(accepted), "gpus_over_budget": len(over),
        "gpus_80_left_whole": free_big, "us_per_placement": per * 1e6,
    }


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['gpus']} GPUs on {r['hosts']} hosts ({r['gpus_80']} of 80 GiB, the rest 24 GiB; "
          f"{r['fleet_vram_gib']} GiB), {r['offered']} services offered ({r['offered_vram_gib']} GiB), seed {r['seed']}")
    w = max(r["whole"], 1)
    print("| allocation | services placed | before the first refusal | × whole GPUs |")
    print("|---|---|---|---|")
    print(f"| whole GPUs, one each | {r['whole']} | {r['whole']} | 1.00 × |")
    print(f"| shared, best-fit (online, arrival order) | {r['best_fit']} | {r['best_fit_before_refusal']} "
          f"| {r['ratio_to_whole']:.2f} × |")
    print(f"| FFD bound, the stream's longest prefix (offline) | – | {r['ffd_prefix']} | {r['ffd_prefix'] / w:.2f} × |")
    print(f"| FFD bound, the smallest services first (offline) | {r['ffd_smallest']} | – | "
          f"{r['ffd_smallest'] / w:.2f} × |")
    print(f"best-fit against FFD: {r['prefix_to_ffd']:.1%} of the prefix bound, "
          f"{r['ratio_to_ffd_smallest']:.1%} of the smallest-first bound")
    print(f"best-fit: {r['best_fit_vram_used']:.1%} of the VRAM committed on {r['best_fit_gpus_opened']} GPUs "
          f"(FFD holds the same services on {r['ffd_gpus_for_best_fit_set']}: {r['ffd_holds_best_fit_set']}); "
          f"GPUs over budget: {r['gpus_over_budget']}; {r['us_per_placement']:.0f} µs a placement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--gpus-per-host", type=int, default=4)
    parser.add_argument("--offered", type=int, default=1500, help="services offered, more than the fleet holds")
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None, help="write the result here too")
    args = parser.parse_args()
    result = measure(args.hosts, args.gpus_per_host, args.offered, args.seed)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
