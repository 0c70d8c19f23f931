import dataclasses

import pytest

from rlhf_jax import embedded
from rlhf_jax.train.common import DataSpec, ModelSpec
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.train.loop import RunConfig

# Smaller than the embedded default (which is 3 layers x 128): compiles in seconds.
TEST_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """The synthetic tokenizer and a random tiny Llama, saved as a Hugging Face checkpoint."""
  return embedded.ensure_assets(tmp_path_factory.mktemp("tiny"), seed=0, **TEST_MODEL)


@pytest.fixture
def small_run(tmp_path):
  def make(**changes):
    # One device by default (learning tests); sharded steps are tested in test_parallel.py and
    # the kill-and-resume test asks for the 8-device mesh.
    # No evaluation before step 0 (the default; tested in test_loop.py): the learning tests
    # measure their own starting point.
    base = RunConfig(steps=20, batch_size=16, log_every=5, output_dir=str(tmp_path / "run"),
                     progress=False, async_checkpoint=False, mesh=MeshConfig(1, 1, 1),
                     eval_at_start=False)
    return dataclasses.replace(base, **changes)
  return make


@pytest.fixture
def model_spec(tiny_model_dir):
  return ModelSpec(path=tiny_model_dir)


@pytest.fixture
def data_spec():
  def make(kind, num_rows=512, **changes):
    return DataSpec(train=f"synthetic:{kind}", num_rows=num_rows, max_length=32, buckets=(32,),
                    eval_fraction=0.25, **changes)
  return make
