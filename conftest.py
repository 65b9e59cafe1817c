from __future__ import annotations

import os

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tokenizer + tiny random llama trained/built on the bundled sample, for axolotl runs."""
    from axolotl_helpers import sample_rows
    from tiny_models import save_tiny_model_dir

    path = tmp_path_factory.mktemp("tiny_llama")
    texts = [t for r in sample_rows() for t in (r["instruction"], r["input"], r["output"])]
    return save_tiny_model_dir(path, texts)


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir
