"""Shared fixtures: the packaged SmolLM2 (its real tokenizer), a tiny 2-layer model built from it,
and one local Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token prompt for the test's local cluster


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from jobs.common.models import pull

    return pull("smollm2-135m-instruct", log=lambda *_: None)


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm_dir, tokenizer) -> Path:
    """A 2-layer llama with SmolLM2's real tokenizer and chat template: random weights, real shapes,
    small enough that vLLM on CPU starts and generates in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from jobs.common.raycluster import RayConfig, init_ray

    init_ray(RayConfig(), log=lambda *_: None)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA GPU (and vLLM's GPU build): elsewhere they are skipped, by name."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
