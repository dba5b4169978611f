"""The search over the solution space: its settings, the Optuna study, trial scoring, best.json, the
dashboard, the memory plan."""
