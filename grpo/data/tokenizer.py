"""Train a small byte-level BPE tokenizer locally (no hub) and wrap it as a transformers tokenizer.

Merges may cross spaces (no word-splitting regex), so a fixed prompt template compresses to a few tokens.

Digits are split one per token so the model sees place value; `<|endoftext|>` is both EOS and padding.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A BPE tokenizer fitted to `texts` whose decode(encode(x)) == x for any text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False)
