"""A pruning plan: the units every pruned layer keeps, in the forms it is stored (JSON lists, per-trial bit masks)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class PrunePlan:
    """Kept units per layer: attention as (kept query heads, kept kv heads), MLP as kept channels (sorted)."""

    attention: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    mlp: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: {"attention": {"4": [[kept q], [kept kv]]}, "mlp": {"4": [kept channels]}}."""
        return self._with_units_as(list)

    @classmethod
    def from_dict(cls, data: Mapping) -> PrunePlan:
        return cls._with_units_from(data, list)

    def encode(self) -> dict:
        """Compact form for the study (one per trial): every kept list as the hex of its bit mask Σ 2^unit."""
        return self._with_units_as(_mask)

    @classmethod
    def decode(cls, data: Mapping) -> PrunePlan:
        return cls._with_units_from(data, _units)

    def _with_units_as(self, form) -> dict:
        return {
            "attention": {str(i): [form(q), form(kv)] for i, (q, kv) in self.attention.items()},
            "mlp": {str(i): form(kept) for i, kept in self.mlp.items()},
        }

    @classmethod
    def _with_units_from(cls, data: Mapping, read) -> PrunePlan:
        return cls(
            {int(i): (read(q), read(kv)) for i, (q, kv) in data["attention"].items()},
            {int(i): read(kept) for i, kept in data["mlp"].items()},
        )

    def units_differing(self, other: PrunePlan) -> dict[str, int]:
        """Units this plan keeps and `other` removes, by kind (both plans keep as many of each)."""
        layers = sorted(set(self.attention) | set(self.mlp) | set(other.attention) | set(other.mlp))
        counts = {"query_heads": 0, "kv_heads": 0, "mlp_channels": 0}
        for i in layers:
            mine, theirs = self.attention.get(i, ([], [])), other.attention.get(i, ([], []))
            counts["query_heads"] += len(set(mine[0]) - set(theirs[0]))
            counts["kv_heads"] += len(set(mine[1]) - set(theirs[1]))
            counts["mlp_channels"] += len(set(self.mlp.get(i, [])) - set(other.mlp.get(i, [])))
        return counts


def _mask(units: list[int]) -> str:
    return hex(sum(1 << u for u in units))


def _units(mask: str) -> list[int]:
    bits = int(mask, 16)
    return [u for u in range(bits.bit_length()) if bits >> u & 1]
