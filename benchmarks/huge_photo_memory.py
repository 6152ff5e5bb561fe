"""Peak memory of a huge subject photo through Subject Mask and Build Feature Cache on a real ComfyUI server.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/huge_photo_memory.py              # 6000x4000, this checkout
    python benchmarks/huge_photo_memory.py --comfyui PATH --pack OTHER_CHECKOUT --size 6000x4000

Starts ComfyUI (``--cpu``, its own base directory, 127.0.0.1) with the pack and the tests' tiny random-weight models
(tests/e2e_nodes: a tiny checkpoint and a tiny SAM), writes a JPEG photo of the given size (a disc on noise), and for
each graph samples the server process's RSS every 2 ms (psutil, as benchmarks/bench.py does for its own process)
from just before the prompt is queued until it has finished:

* ``subject_mask``: LoadImage -> Subject Mask (auto, tiny SAM, train layout 512) -> Build Feature Cache (64) -> Save;
* ``direct``: LoadImage -> Build Feature Cache (pad, 64) -> Save (the photo straight into the cache).

It prints the peak above the resident baseline (RSS before the prompt, after a warm-up prompt on a small photo that
loads the models) in MB and as a multiple of the decoded photo (the IMAGE tensor, H x W x 3 float32); the issue's
bound is 3x. LoadImage's own decoding is included (it is part of the prompt). Not a test: nothing is asserted;
``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def write_photo(path: Path, w: int, h: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = (rng.random((h, w, 3)) * 120).astype(np.uint8)
    yy, xx = np.ogrid[:h, :w]
    disc = (xx - w * 0.55) ** 2 + (yy - h * 0.5) ** 2 <= (min(w, h) * 0.35) ** 2
    img[disc] = (230, 80, 50)
    Image.fromarray(img).save(path, quality=92)


def graph(photo: str, direct: bool, prefix: str, again: bool = False) -> dict:
    """The graph; ``again`` changes the pack's nodes' inputs a little, so they run again while ComfyUI serves
    LoadImage's IMAGE from its cache (the pack's own peak)."""
    p = {
        "1": {"class_type": "DreamCacheTestTinyCheckpoint", "inputs": {"family": "sd1", "seed": 0}},
        "2": {"class_type": "DreamCacheLoader", "inputs": {"adapter_name": "tiny_sd1.safetensors",
                                                           "base_family": "from file"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "4": {"class_type": "DreamCacheBuildFeatureCache", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": ["3", 0] if direct else ["6", 0], "clip": ["1", 1],
            "adapter": ["2", 0], "seed": int(again), "resolution": 64, "fit": "pad", "batch_mode": "concat"}},
        "5": {"class_type": "DreamCacheSave", "inputs": {"cache": ["4", 0], "filename_prefix": prefix,
                                                         "dtype": "fp32"}},
    }
    if not direct:
        p["7"] = {"class_type": "DreamCacheTestTinySAM", "inputs": {"seed": 123}}
        p["6"] = {"class_type": "DreamCacheSubjectMask", "inputs": {
            "image": ["3", 0], "prompt_mode": "auto", "sam": ["7", 0], "box_x": 0, "box_y": 0, "box_width": 0,
            "box_height": 0, "positive_points": "", "negative_points": "", "threshold": 0.49 if again else 0.5,
            "grow": 0,
            "feather": 0, "layout": "train", "size": 512, "background": "#ffffff", "invert_mask": False}}
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (or COMFYUI_PATH)")
    ap.add_argument("--pack", default=str(ROOT), help="the pack checkout to measure (default: this one)")
    ap.add_argument("--size", default="6000x4000", help="photo WxH")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    if not args.comfyui:
        sys.exit("Set COMFYUI_PATH or pass --comfyui.")
    pack = Path(args.pack).resolve()
    sys.path.insert(0, str(pack))
    sys.path.insert(0, str(pack / "tests"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rss import PeakRSS  # benchmarks/rss.py, beside this script
    from test_e2e_server import write_tiny_adapter

    from dreamcache.apps.run.comfy_client import ComfyServer

    w, h = (int(v) for v in args.size.lower().split("x"))
    base = Path(tempfile.mkdtemp(prefix="dreamcache-hugephoto-"))
    try:
        (base / "custom_nodes").mkdir(parents=True)
        os.symlink(pack, base / "custom_nodes" / "ComfyUI-DreamCache")
        os.symlink(pack / "tests" / "e2e_nodes", base / "custom_nodes" / "dreamcache_test_nodes")
        for d in ("dreamcache", "dreamcache_caches", "sams"):
            (base / "models" / d).mkdir(parents=True)
        write_tiny_adapter(base / "models" / "dreamcache" / "tiny_sd1.safetensors", "sd1")
        (base / "input").mkdir()
        for name in ("subject_mask", "direct"):
            write_photo(base / "input" / f"huge_{name}.jpg", w, h)
        write_photo(base / "input" / "small.jpg", 640, 480)
        srv = ComfyServer(args.comfyui, base_directory=str(base), cpu=True, log_path=str(base / "server.log"))
        srv.start()
        decoded = w * h * 3 * 4
        results = {"photo": f"{w}x{h}", "decoded_photo_mb": decoded / 1e6, "pack": str(pack), "graphs": {}}
        try:
            for direct in (False, True):
                name = "direct" if direct else "subject_mask"
                srv.client.wait(srv.client.queue(graph("small.jpg", direct, f"warm_{name}")), timeout=600)
                for again, what in ((False, "with LoadImage"), (True, "pack nodes only, LoadImage cached")):
                    time.sleep(1.0)
                    with PeakRSS(srv.proc.pid) as rss:
                        srv.client.wait(srv.client.queue(graph(f"huge_{name}.jpg", direct, f"huge_{name}", again)),
                                        timeout=1200)
                    over = rss.peak - rss.start
                    results["graphs"][f"{name} ({what})"] = {
                        "baseline_mb": rss.start / 1e6, "peak_above_baseline_mb": over / 1e6,
                        "x_decoded_photo": over / decoded, "after_mb": rss.end / 1e6}
                    print(f"{name:>13} ({what}): peak {over / 1e6:5.0f} MB above the resident {rss.start / 1e6:.0f} MB"
                          f" = {over / decoded:.2f}x the decoded photo ({decoded / 1e6:.0f} MB)", flush=True)
        finally:
            srv.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
