"""Time one SubjectMask run in auto mode with a SAM of real size (random weights: speed does not depend on them).

    python benchmarks/subject_mask_speed.py                # vit_b, one 1024x1024 image, CPU
    python benchmarks/subject_mask_speed.py --variant vit_h --device cuda --repeats 5

Runs exactly what the node runs after ComfyUI has loaded the model: SAM auto prediction (image encoder, two prompt
decodes, upscaling), threshold/grow/feather and the train layout. Prints the median of the repeats after one warm-up,
the split between the image encoder and everything else, and a re-run on the same photo with other mask options
(the image embedding then comes from the loaded SAM's cache). Minimums are printed too: on a shared machine they are
the most stable numbers. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dreamcache.core import sam as core_sam  # noqa: E402
from dreamcache.core import subject  # noqa: E402


def photo(size: int) -> torch.Tensor:
    """A coloured disc on noise, [1, size, size, 3]."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, size, size, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((xx - size * 0.55) ** 2 + (yy - size * 0.5) ** 2) <= (size * 0.3) ** 2
    img[0][disc] = torch.tensor([0.9, 0.3, 0.2])
    return img


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="vit_b", choices=list(core_sam.VARIANTS))
    ap.add_argument("--size", type=int, default=1024, help="side of the square test image in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    sa = core_sam.require_segment_anything()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    sam = getattr(sa, core_sam.VARIANTS[args.variant].builder)().to(device).eval()
    sam.requires_grad_(False)
    build_s = time.perf_counter() - t0
    img = photo(args.size)

    def segment(rgb):
        return core_sam.predict_batch(sam, rgb, "auto")

    def run_node_path():
        probs = subject.subject_probabilities(img, "auto", segment=segment)
        masks = subject.refine_masks(probs, threshold=0.0)  # random weights: keep whatever SAM gives
        return subject.make_reference(img, masks, layout="train", size=512), masks

    def encoder_only():
        core_sam.embed_image(sam, img[0].to(device))

    cache = core_sam.EmbeddingCache()

    def rerun_other_options():
        """The node again on the same photo with other mask options: the embedding comes from the SAM's cache."""
        probs = subject.subject_probabilities(img, "auto", segment=lambda rgb: core_sam.predict_batch(sam, rgb, "auto",
                                                                                                      cache=cache))
        return subject.make_reference(img, subject.refine_masks(probs, threshold=0.0, feather=4), layout="train",
                                      size=512)

    with torch.inference_mode():
        run_node_path()  # warm-up
        sync(device)
        rerun_other_options()  # fills the embedding cache
        totals, encs, reruns = [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref, masks = run_node_path()
            sync(device)
            totals.append(time.perf_counter() - t)
            t = time.perf_counter()
            encoder_only()
            sync(device)
            encs.append(time.perf_counter() - t)
            t = time.perf_counter()
            rerun_other_options()
            sync(device)
            reruns.append(time.perf_counter() - t)

    result = {
        "variant": args.variant, "image": f"{args.size}x{args.size}", "device": str(device),
              "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "build_random_weights_s": round(build_s, 2), "repeats": args.repeats,
        "subject_mask_auto_s_median": round(statistics.median(totals), 3),
              "subject_mask_auto_s_min": round(min(totals), 3),
        "subject_mask_auto_s_all": [round(t, 3) for t in totals],
        "image_encoder_s_median": round(statistics.median(encs), 3), "image_encoder_s_min": round(min(encs), 3),
        "rerun_same_photo_other_options_s_median": round(statistics.median(reruns), 3),
        "output": list(ref.shape), "mask": list(masks.shape),
    }
    result["rest_s_median"] = round(result["subject_mask_auto_s_median"] - result["image_encoder_s_median"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
