from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import make_model, make_sae

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saes") / "resid1"
    make_sae(path, "blocks.1.hook_resid_post")
    return path
