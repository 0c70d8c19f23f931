"""TRL's DPOTrainer on the same shapes as `dpo_step.py`: the external reference for its figures.

Needs `trl` (and `accelerate`), which the project does not depend on. A word-level tokenizer built
here maps "w<i>" to token i, so the prompt and the responses have exactly the token counts of
`dpo_step.py`'s batch (TRL appends an EOS to each response: one token more per row).

    pip install trl
    python benchmarks/dpo_step_trl.py --layers 2 --batch 1 --seq 256 --prompt 64 --vocab 32768 \
      --dtype float32

Prints the median step time over the timed steps (measured by a callback around each optimiser
step: forward and backward of policy and reference, AdamW) and tokens/s over 2·batch·seq tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def word_tokenizer(vocab: int):
  import tokenizers
  import transformers

  words = {f"w{i}": i for i in range(3, vocab)} | {"<pad>": 0, "<eos>": 1, "<unk>": 2}
  model = tokenizers.models.WordLevel(words, unk_token="<unk>")
  raw = tokenizers.Tokenizer(model)
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  raw.add_special_tokens(["<pad>", "<eos>", "<unk>"])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>",
                                              eos_token="<eos>", unk_token="<unk>")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--remat", action="store_true", help="gradient checkpointing")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up)")
  args = parser.parse_args()

  import datasets
  import torch
  import transformers
  import trl

  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  response = args.seq - args.prompt - 1  # TRL appends EOS
  rows = []
  for _ in range(args.batch * (args.steps + 1)):
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(3, args.vocab, n))
    rows.append({"prompt": words(args.prompt), "chosen": " " + words(response),
                 "rejected": " " + words(response)})
  config = transformers.Qwen2Config(
      vocab_size=args.vocab, hidden_size=896, intermediate_size=4864,
      num_hidden_layers=args.layers, num_attention_heads=14, num_key_value_heads=2,
      tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1_000_000.0,
      pad_token_id=0, eos_token_id=1, bos_token_id=None)
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, *_, **__):
      if torch.cuda.is_available():
        torch.cuda.synchronize()
      self.start = time.perf_counter()

    def on_step_end(self, *_, **__):
      if torch.cuda.is_available():
        torch.cuda.synchronize()
      times.append(time.perf_counter() - self.start)

  with tempfile.TemporaryDirectory() as out:
    # TRL builds its reference model from the policy's path, so the random model is saved first.
    transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(
        f"{out}/model")
    model = transformers.AutoModelForCausalLM.from_pretrained(f"{out}/model", dtype=dtype)
    trainer = trl.DPOTrainer(
        model=model, processing_class=word_tokenizer(args.vocab),
        train_dataset=datasets.Dataset.from_list(rows),
        args=trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
            learning_rate=1e-6, beta=0.1, max_length=args.seq, logging_steps=10**6,
            save_strategy="no", report_to=[], gradient_checkpointing=args.remat,
            bf16=args.dtype == "bfloat16" and torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0),
        callbacks=[Timer()])
    lengths = [len(trainer.train_dataset[0][k]) for k in ("prompt_ids", "chosen_ids")]
    trainer.train()
  step = statistics.median(times[1:])
  tokens = 2 * args.batch * args.seq
  device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
  print(f"device={device} trl={trl.__version__} layers={args.layers} vocab={args.vocab} "
        f"pairs={args.batch} seq={args.seq} (prompt {lengths[0]} + response {lengths[1]} tokens) "
        f"dtype={args.dtype} remat={args.remat}")
  print(f"{'TRL DPOTrainer':16s} step={step * 1e3:9.1f} ms  tokens/s={tokens / step:10.0f}")


if __name__ == "__main__":
  main()
