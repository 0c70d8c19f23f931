"""The embedded tasks' checkpoints: a tokenizer and a randomly initialised tiny model, on disk.

`data/` holds the tasks' languages, rows and tokenizers and knows no models; this module, above
both, writes a task's tokenizer with a fresh `TINY_MODEL` Llama sized to its vocabulary as a
Hugging Face checkpoint, so the embedded model loads through the same code as any other
(`rlhf_jax.models.from_pretrained(directory)`, `AutoTokenizer.from_pretrained(directory)`).
Model paths "synthetic:tiny[:seed]" (the review task) and "synthetic:arith[:seed]" (the
arithmetic task) resolve to a cached copy (`rlhf_jax.train.common.resolve_model_path`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from rlhf_jax.data import arithmetic, synthetic

__all__ = ["TASKS", "ensure_assets"]

# task name -> its tokenizer builder
TASKS = {"review": synthetic.build_tokenizer, "arith": arithmetic.build_tokenizer}


def ensure_assets(directory: str | pathlib.Path, *, task: str = "review", seed: int = 0,
                  **model_overrides) -> str:
  """Writes a task's tokenizer and a random tiny Llama checkpoint to `directory` once.

  Safe when several processes of one job call it at once: each writes a private copy and moves
  it into place; whoever comes second keeps the first one (the contents are the same, a pure
  function of the arguments).
  """
  import jax
  from transformers import LlamaConfig

  from rlhf_jax import models

  if task not in TASKS:
    raise ValueError(f"unknown embedded task {task!r}; expected one of {sorted(TASKS)}")
  directory = pathlib.Path(directory)
  spec = {"seed": seed, **synthetic.TINY_MODEL, **model_overrides}
  if task != "review":
    spec["task"] = task
  marker = directory / "synthetic_assets.json"
  if marker.exists() and json.loads(marker.read_text()) == spec:
    return str(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
  try:
    tokenizer = TASKS[task]()
    tokenizer.save_pretrained(staging)
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **{**synthetic.TINY_MODEL, **model_overrides})
    model = models.CausalLM(models.ModelConfig.from_hf(hf_config))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      params = model.init(jax.random.key(seed))
    models.save_pretrained(model, params, staging)
    (staging / "synthetic_assets.json").write_text(json.dumps(spec))
    if directory.exists():  # stale (other settings) or being written: replace only if stale
      if marker.exists() and json.loads(marker.read_text()) == spec:
        return str(directory)
      shutil.rmtree(directory, ignore_errors=True)
    try:
      os.replace(staging, directory)
    except OSError:  # another process moved its copy in first
      if not (marker.exists() and json.loads(marker.read_text()) == spec):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return str(directory)
