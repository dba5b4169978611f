"""Cutting the model: the prune pipeline, unit removal, compensation, sequential pruning."""
