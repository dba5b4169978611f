"""Text: the corpora, calibration windows and their addresses, fine-tuning data."""
