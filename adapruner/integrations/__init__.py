"""Adapters that let other pruning libraries use adapruner's importance (optional extras)."""
