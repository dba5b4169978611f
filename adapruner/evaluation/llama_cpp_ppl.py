"""The next-token loss of a GGUF model in llama.cpp (llama-cpp-python), window by window as transformers computes it."""

from __future__ import annotations

import numpy as np
import torch


def llama_cpp_nll(llm, windows: torch.Tensor) -> float:
    """Mean next-token NLL of the loaded `llama_cpp.Llama` (built with `logits_all=True`) over `windows` [N, T],
    each evaluated from an empty context: mean over N·(T − 1) predictions of −log softmax(logits)[next token]."""
    total = 0.0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
        total += float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None]).sum())
    return total / (windows.shape[0] * (windows.shape[1] - 1))
