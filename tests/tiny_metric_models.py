"""Tiny random-weight metric models in the layout the evaluation's loader reads (no downloads).

A DINO-like ``ViTModel`` and a ``CLIPModel`` built from small ``transformers`` configs, each saved with
``save_pretrained`` into a folder together with its image processor (and, for CLIP, a word-level tokenizer
built here with ``tokenizers``): the same files a downloaded facebook/dino-vits16 or openai/clip-vit-base-patch32
folder holds (config.json, model.safetensors, preprocessor_config.json, tokenizer files).
"""

from __future__ import annotations

from pathlib import Path

IMAGE = 32
WORDS = (
    "a an the in on of with top and it red purple shiny wet cube shaped backpack dog cat toy bowl can "
    "candle jungle snow beach street wooden floor city mountain blue house rug forest wheat field tree "
    "autumn leaves eiffel tower floating water ocean milk green grass sunflowers around mirror sidewalk "
    "crowded dirt road white pink fabric cobblestone background hat santa scarf rainbow black monocle "
    "chef outfit firefighter police glasses yellow shirt wizard wearing photo"
).split()


def make_tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", special_tokens=[("[EOS]", 2)]
    )  # CLIP pools at the EOS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", model_max_length=max_length
    ), len(vocab)


def make_dino(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=16,
    )
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return Path(folder)


def make_clip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer, vocab_size = make_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "bos_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    return Path(folder)
