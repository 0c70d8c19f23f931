"""Fixtures of the model tests (helpers live in hf_reference.py)."""

import pytest

from hf_reference import FAMILIES, make_hf_model


@pytest.fixture(scope="session")
def hf_lm_dirs(tmp_path_factory):
  """family -> (torch model, checkpoint dir) for every causal-LM family (hf_reference.FAMILIES)."""
  out = {}
  for family in FAMILIES:
    directory = tmp_path_factory.mktemp(f"hf_{family}")
    out[family] = (make_hf_model(family, directory), directory)
  return out
