"""A tiny Segment Anything model with seeded random weights, built from segment_anything's own classes.

Same architecture as the real ViT-B/L/H SAM (windowed + global attention with relative positions, prompt encoder,
two-way transformer mask decoder, IoU head), only smaller: a 2-block, 64-wide encoder on 256-pixel inputs. Runs
the whole SubjectMask path on a CPU in milliseconds. Needs only torch and segment-anything (no ComfyUI).
"""
from __future__ import annotations

from functools import partial

import torch

IMG_SIZE = 256
PATCH = 16
PROMPT_DIM = 32


def make_tiny_sam(seed: int = 0, scale: float = 4.0) -> torch.nn.Module:
    """Seeded weights; ``scale`` multiplies the matrices so the random decoder gives masks with real edges (at 1 its
    logits stay near 0 and every mask is empty or full)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    emb = IMG_SIZE // PATCH
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the modules' own init (then overwritten below) must not depend on the global RNG
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=2, embed_dim=64, img_size=IMG_SIZE, mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm,
                                                                                          eps=1e-6), num_heads=2,
                patch_size=PATCH, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4,
                                          out_chans=PROMPT_DIM,
            ),
            prompt_encoder=PromptEncoder(embed_dim=PROMPT_DIM, image_embedding_size=(emb, emb),
                                         input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=8),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=64, num_heads=2),
                transformer_dim=PROMPT_DIM, iou_head_depth=3, iou_head_hidden_dim=32,
            ),
        )
    with torch.no_grad():
        for name, p in sorted(sam.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * scale / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        buf = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        buf.copy_(torch.randn(buf.shape, generator=g))
    sam.eval()
    sam.requires_grad_(False)
    return sam


TINY_VARIANT = "tiny"


def register_tiny_variant(core_sam, monkeypatch, seed: int = 123):
    """Make the tiny SAM a known variant of ``core_sam`` (the pack's ``dreamcache.sam`` module), as if it were a fourth
    official checkpoint: detection by shapes, the meta build and the strict load then run their real code on it."""
    import segment_anything

    monkeypatch.setitem(core_sam.VARIANTS, TINY_VARIANT, core_sam.SamVariant(TINY_VARIANT, 64, 2, 2, "build_tiny_sam",
                                                                             "tiny.pth", "1 MB"))
    monkeypatch.setattr(segment_anything, "build_tiny_sam", lambda: make_tiny_sam(seed=seed), raising=False)
