"""The model: loading, family adapters, prunable structure, input checks, dispatch over devices, cost measures."""
