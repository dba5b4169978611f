"""Statistics of calibration passes and the importance scores made from them: the metric registry,
OBS, the activation cache, the refit pool."""
