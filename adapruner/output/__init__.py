"""What leaves the tool: saved models, GGUF export, model cards, reports."""
