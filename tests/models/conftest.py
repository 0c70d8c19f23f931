"""Fixtures of the model tests (helpers live in hf_reference.py)."""

import pytest

from hf_reference import make_hf_model


@pytest.fixture(scope="session")
def hf_lm_dirs(tmp_path_factory):
  """family -> (torch model, checkpoint dir) for the four causal-LM families."""
  out = {}
  for family in ("gpt2", "llama", "qwen2", "mistral"):
    directory = tmp_path_factory.mktemp(f"hf_{family}")
    out[family] = (make_hf_model(family, directory), directory)
  return out
