"""Owner-computes sharding: which rank updates which tensor (pure, no process group).

Each tensor has exactly one owner; owners are balanced by element count (largest first to
the least-loaded rank, ties to the lower rank), so every rank derives the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OwnershipPlan:
    owner: dict  # tensor name → rank
    world_size: int

    def owned_by(self, rank: int) -> list[str]:
        """Names owned by `rank`, in the plan's (model) order."""
        return [n for n, r in self.owner.items() if r == rank]

    def loads(self, sizes: dict[str, int]) -> list[int]:
        out = [0] * self.world_size
        for n, r in self.owner.items():
            out[r] += sizes[n]
        return out


def plan_ownership(sizes: dict[str, int], world_size: int) -> OwnershipPlan:
    """`sizes`: tensor name → element count, in model order. Returns the plan (model order kept)."""
    if world_size < 1:
        raise ValueError("world_size must be ≥ 1")
    load = [0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], list(sizes).index(n))):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += sizes[name]
    return OwnershipPlan({n: owner[n] for n in sizes}, world_size)
