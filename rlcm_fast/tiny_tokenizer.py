"""A byte-level CLIP tokenizer built in code, so the built-in model presets need no download.

Its vocabulary is the 256 byte-level symbols, each alone and with CLIP's end-of-word suffix, plus
CLIP's two special tokens; it has no merges, so every character of a prompt is one token (77 tokens
hold ~75 characters). Ids stay below 514, which fits every built-in preset's text encoder (vocabularies
of 514 or 49408).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
CLIP_MAX_TOKENS = 77


def build_clip_tokenizer() -> CLIPTokenizer:
    # Sorted so the ids do not depend on the alphabet's set order.
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    vocab.update({symbol + "</w>": len(byte_symbols) + index for index, symbol in enumerate(byte_symbols)})
    vocab[START_OF_TEXT] = len(vocab)
    vocab[END_OF_TEXT] = len(vocab)
    # Through vocab.json/merges.txt files: the one constructor transformers 4 and 5 share.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        Path(folder, "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
        # Special tokens and padding as in the real CLIP tokenizer (it pads with <|endoftext|>).
        return CLIPTokenizer.from_pretrained(
            folder,
            bos_token=START_OF_TEXT,
            eos_token=END_OF_TEXT,
            unk_token=END_OF_TEXT,
            pad_token=END_OF_TEXT,
            model_max_length=CLIP_MAX_TOKENS,
        )
