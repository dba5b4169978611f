"""Shared fixtures: tiny random LLaMA-family models for unit tests (built in tests/models.py), the real SmolLM2-135M
once per session."""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU only in the interpreter; set before triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

import pytest  # noqa: E402  (after TRITON_INTERPRET is set)
from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # noqa: E402

from tests.models import tiny_llama, tiny_qwen2, word_level_tokenizer  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device tests run kernels and models on: CUDA when present, else the CPU (Triton under its interpreter)."""
    return TEST_DEVICE


@pytest.fixture
def tokenizer():
    return word_level_tokenizer()


@pytest.fixture
def mha_model() -> LlamaForCausalLM:
    return tiny_llama(4, 4)


@pytest.fixture
def gqa_model() -> LlamaForCausalLM:
    return tiny_llama(6, 2)


@pytest.fixture
def qwen2_model() -> Qwen2ForCausalLM:
    return tiny_qwen2()


@pytest.fixture
def token_batch() -> torch.Tensor:
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(items):
    """Every test that loads the embedded model carries the `smollm2` marker (`-m "not smollm2"` runs without it)."""
    for item in items:
        if {"smollm2", "smollm2_loaded"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.smollm2)


@pytest.fixture(scope="session")
def smollm2_loaded():
    from adapruner.model.models import load_model

    return load_model("smollm2")


@pytest.fixture
def smollm2(smollm2_loaded):
    """A fresh copy of SmolLM2-135M (tests may prune it) and its tokenizer."""
    model, tokenizer = smollm2_loaded
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL cluster on loopback for this test session (see tests/pg_server.py)."""
    from tests.pg_server import postgres_cluster, server_binaries

    if server_binaries() is None:
        pytest.skip("PostgreSQL is not installed here: .ci/run installs it (apt-get install postgresql)")
    with postgres_cluster() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """An empty study storage: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    from tests.pg_server import create_database

    return create_database(request.getfixturevalue("postgres_server"), f"t_{abs(hash(request.node.nodeid)) % 10**12}")
