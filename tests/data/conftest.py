import pytest

from rlhf_jax.data import synthetic


@pytest.fixture(scope="session")
def word_tokenizer():
  """The synthetic task's word-level tokenizer: adds <bos>, chat template without BOS."""
  return synthetic.build_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer():
  """A small byte-level BPE trained here, where 'hello' is one token (for boundary tests)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["hello world, hello there, say hello", "The answer is yes. The answer is no."] * 50
  tok.train_from_iterator(corpus, trainer=trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>")
