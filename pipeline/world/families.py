"""Every helpful task family by name: the world's five that check a computation or a memorised fact
(pipeline/world/tasks.py) and the two answered from the prompt itself (pipeline/world/context_tasks.py)."""

from __future__ import annotations

from pipeline.world.context_tasks import context_families
from pipeline.world.facts import FactBase
from pipeline.world.tasks import Family, helpful_families

# The first five check a computation or a memorised fact (world v1), the last two are answered from the prompt.
FAMILY_NAMES = ("arithmetic", "sort", "count", "unit", "fact", "lookup", "pick")


def make_families(names: tuple[str, ...], facts: FactBase, format_share: float) -> list[Family]:
    """The named helpful families (FAMILY_NAMES), in order; the in-context ones ask for a format at `format_share`."""
    known = {f.name: f for f in (*helpful_families(facts), *context_families(format_share))}
    return [known[name] for name in names]
