"""Tiny random models for the reward tests, built in code and saved to local folders (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_WORDS = ["the", "image", "contains", "a", "an", "cat", "dog", "riding", "bike", "playing", "chess", "washing",
               "dishes", "of", "photo", "is", "on", "in", "what", "going", "this"]


def clip_image_processor(size: int = 32):
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_tiny_clip(folder: Path, projection_dim: int = 768, seed: int = 0) -> Path:
    """A CLIPModel with 2-layer 32-wide towers, its tokenizer and image processor (32 px), in `folder`."""
    from transformers import CLIPConfig, CLIPModel

    from rlcm_fast.tiny_tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    clip_image_processor().save_pretrained(folder)
    return Path(folder)


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with a small word-level vocabulary written here."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB_WORDS, *letters, *[f"##{c}" for c in letters]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=2, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A LLaVA (tiny CLIP vision tower + tiny Llama) with an offline byte-level tokenizer and a processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from rlcm_fast.tiny_tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor = LlavaProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(folder)
    return Path(folder)
