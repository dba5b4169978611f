"""One library call per CLI command (`prune`, `search`, `run`, `finetune`, `eval`), each taking the settings object
whose defaults the flags show."""
