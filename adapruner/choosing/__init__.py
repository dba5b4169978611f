"""Which units go: the prune settings, the allocation rules and counts, unit selection, the plan."""
