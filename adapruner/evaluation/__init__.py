"""Recovery and evaluation: LoRA fine-tuning, perplexity, zero-shot tasks, tokens/s."""
