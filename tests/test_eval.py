"""``python -m dreamcache.eval``: the DreamBench protocol, its metrics, outputs, resume and shards.

Protects: the protocol's bookkeeping on the real DreamBench folder (30 subjects, 21 objects and 9 live, the two
prompt lists with the class noun and no unique token, 3,000 images, seeds that do not change between processes,
versions or shards), the metric arithmetic against cosines computed by hand, the metric models' loading (CLS token
for DINO, CLIP's projected features, each model's own processor; one clear sentence for a missing model, never a
download), the real photos (615² to 2048², EXIF orientation) through SubjectMask's preprocessing, the tables with
the paper's Table 2 rows, the grids; and with ComfyUI (tiny models): the generation is the nodes' own path, the
baseline row, resume generates nothing new, shards whose union is the unsharded run, and the trainer's --eval-every.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamcache.apps.eval import protocol as P
from dreamcache.core.errors import DreamCacheError

ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = P.find_dreambench(None, ROOT)
needs_dreambench = pytest.mark.skipif(
    DREAMBENCH is None, reason="DreamBench not found (set DREAMBENCH_PATH or keep shared/dreambench beside the repo)"
)


@pytest.fixture(scope="module")
def proto():
    if DREAMBENCH is None:
        pytest.skip("DreamBench not found (set DREAMBENCH_PATH or keep shared/dreambench beside the repo)")
    return P.load_protocol(DREAMBENCH)


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    pytest.importorskip("transformers", reason="the metrics use transformers (a ComfyUI requirement)")
    from tiny_metric_models import make_clip, make_dino

    d = tmp_path_factory.mktemp("metric_models")
    return make_dino(d / "dino"), make_clip(d / "clip")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: the loader itself passes local_files_only=True


# ---- protocol -------------------------------------------------------------------------------------------------------


def test_protocol_has_the_30_subjects_their_prompts_and_3000_images(proto):
    assert len(proto.subjects) == 30
    live = sorted(s.name for s in proto.subjects if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert sum(not s.live for s in proto.subjects) == 21
    assert len(proto.object_prompts) == len(proto.live_prompts) == 25
    backpack, dog = proto.subject("backpack"), proto.subject("dog")
    obj = [p for _, p in proto.prompts(backpack)]
    liv = [p for _, p in proto.prompts(dog)]
    assert obj[0] == "a backpack in the jungle" and liv[0] == "a dog in the jungle"
    assert obj[10] == "a backpack with a wheat field in the background" and liv[10] == "a dog wearing a red hat"
    assert obj[24] == "a cube shaped backpack" and liv[24] == "a cube shaped dog"
    assert [p for _, p in proto.prompts(proto.subject("bear_plushie"))][20] == "a red stuffed animal"
    assert all("{" not in p and "  " not in p for s in proto.subjects for _, p in proto.prompts(s))
    assert all(proto.reference_image(s).name == "00.jpg" for s in proto.subjects)
    items = proto.items(["m"])
    assert len(items) == 3000  # 30 subjects x 25 prompts x 4 images
    assert len({it.key for it in items}) == len({it.file for it in items}) == 3000
    assert len({it.seed for it in items}) == 3000 and all(0 <= it.seed < 2**53 for it in items)
    assert len(proto.items(["a", "b"])) == 6000


def test_subsets_and_reference_choice(proto):
    p = P.load_protocol(DREAMBENCH, ["dog", "can"], prompts=[3, 0], images_per_prompt=2, reference="01")
    assert [s.name for s in p.subjects] == ["dog", "can"]
    assert [i for i, _ in p.prompts(p.subjects[0])] == [0, 3]
    assert len(p.items(["m"])) == 2 * 2 * 2 and p.reference_image(p.subjects[0]).name == "01.jpg"
    # the same image has the same seed in the full protocol and in a subset
    full = {it.key: it.seed for it in proto.items(["m"])}
    assert all(full[it.key] == it.seed for it in p.items(["m"]))
    for bad, match in (
        (dict(subjects=["nope"]), "no subject 'nope'"),
        (dict(prompts=30), "between 1 and 25"),
        (dict(reference="07"), "no reference image '07'"),
        (dict(images_per_prompt=0), "at least 1"),
    ):
        with pytest.raises(DreamCacheError, match=match):
            P.load_protocol(DREAMBENCH, **bad)


def test_seeds_are_pinned_and_do_not_depend_on_the_process():
    assert (
        P.seed_for("dog", "a dog in the jungle", 0) == 1672761659279085
    )  # pinned: old runs resume with the same seeds
    assert P.seed_for("dog", "a dog in the jungle", 1) != P.seed_for("dog", "a dog in the jungle", 0)
    assert P.seed_for("dog", "a dog in the jungle", 0, base=1) != P.seed_for("dog", "a dog in the jungle", 0)
    code = ("from dreamcache.apps.eval.protocol import seed_for; "
            "print([seed_for(s, 'a ' + s, i) for s in ('cat', 'can') for i in range(3)])")
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": h},
        ).stdout
        for h in ("1", "2", "random")
    }
    assert len(outs) == 1 and outs.pop().strip() == str(
        [P.seed_for(s, "a " + s, i) for s in ("cat", "can") for i in range(3)]
    )


def test_shards_partition_the_images(proto):
    items = proto.items(["m", "n"])
    for n in (1, 2, 3, 7):
        parts = [P.shard_items(items, (i, n)) for i in range(1, n + 1)]
        keys = [{it.key for it in part} for part in parts]
        assert sum(len(k) for k in keys) == len(items) and set().union(*keys) == {it.key for it in items}
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= proto.images_per_prompt
        # a prompt's images stay together; the split and the seeds are the same every time
        for part in parts:
            groups = {P.group_key(it) for it in part}
            assert sum(1 for it in items if P.group_key(it) in groups) == len(part)
        assert [it.seed for it in P.shard_items(items, (1, n))] == [it.seed for it in parts[0]]
    assert P.parse_shard("2/4") == (2, 4) and P.parse_shard(None) == (1, 1)
    for bad in ("0/2", "3/2", "x", "1-2"):
        with pytest.raises(DreamCacheError, match="I/N"):
            P.parse_shard(bad)


def test_prompts_file_errors(tmp_path):
    (tmp_path / P.PROMPTS_FILE).write_text("nothing useful\n")
    with pytest.raises(DreamCacheError, match="not DreamBench's prompts_and_classes.txt"):
        P.load_protocol(tmp_path)
    with pytest.raises(DreamCacheError, match="not a DreamBench folder"):
        P.load_protocol(tmp_path / "missing")


# ---- metric arithmetic --------------------------------------------------------------------------------------------


class FixedEmbedder:
    """Embeds an image as the fixed vector its top-left pixel value selects (and a text by a table)."""

    def __init__(self, table: dict, texts: dict | None = None):
        self.table, self.text_table = table, texts or {}
        self.calls = []

    def images(self, images):
        self.calls.append(len(images))
        from dreamcache.apps.eval.metrics import normalize

        return normalize(torch.tensor([self.table[int(im[0, 0, 0])] for im in images], dtype=torch.float64))

    def texts(self, texts):
        from dreamcache.apps.eval.metrics import normalize

        return normalize(torch.tensor([self.text_table[t] for t in texts], dtype=torch.float64))


def _img(v, mask_box=None):
    a = np.full((8, 8, 3), v, dtype=np.uint8)
    return a


def test_metric_arithmetic_matches_cosines_by_hand():
    from dreamcache.apps.eval.metrics import Scorers, score_images

    dino = FixedEmbedder(
        {1: [1, 0, 0], 2: [1, 1, 0], 3: [0, 2, 2], 10: [1, 2, 3], 20: [0, 0, 5], 255: [4, 4, 1], 7: [3, 0, 4]}
    )
    clip = FixedEmbedder(
        {1: [0, 1], 2: [1, 1], 3: [3, 4], 10: [1, 0], 20: [-1, 1], 255: [2, 3], 7: [1, -1]},
        {"a dog": [1, 2], "a can": [-2, 1]},
    )
    gen = [_img(1), _img(2), _img(3)]
    refs = {"dog": _img(10), "can": _img(20)}
    rows = score_images(Scorers(dino, clip), gen, ["a dog", "a dog", "a can"], ["dog", "dog", "can"], refs)

    def cos(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert rows[0]["dino"] == pytest.approx(cos([1, 0, 0], [1, 2, 3]), abs=1e-6)  # 0.267261
    assert rows[1]["dino"] == pytest.approx(cos([1, 1, 0], [1, 2, 3]), abs=1e-6)  # 0.566947
    assert rows[2]["dino"] == pytest.approx(cos([0, 2, 2], [0, 0, 5]), abs=1e-6)  # 0.707107
    assert rows[2]["clip_i"] == pytest.approx(cos([3, 4], [-1, 1]), abs=1e-6)  # 0.141421
    assert rows[0]["clip_t"] == pytest.approx(cos([0, 1], [1, 2]), abs=1e-6)  # 0.894427
    assert rows[2]["clip_t"] == pytest.approx(cos([3, 4], [-2, 1]), abs=1e-6)  # -0.178885
    assert rows[0]["dino"] == pytest.approx(0.2672612419, abs=1e-6) and rows[2]["clip_t"] == pytest.approx(
        -2 / (5 * 5**0.5), abs=1e-6
    )
    assert "dino_masked" not in rows[0]
    assert dino.calls == [3, 2]  # each distinct reference embedded once

    # masked: both images reduced to the subject on white (pixel value 255 outside the mask)
    gm = [np.zeros((8, 8), bool), np.ones((8, 8), bool), None]
    gm[0][:, 4:] = True  # image 0: subject on the right half; the top-left pixel becomes white (255)
    rm = {"dog": np.ones((8, 8), bool)}
    rows = score_images(Scorers(dino, clip), gen, ["a dog", "a dog", "a can"], ["dog", "dog", "can"], refs, gm, rm)
    assert rows[0]["dino_masked"] == pytest.approx(cos([4, 4, 1], [1, 2, 3]), abs=1e-6)
    assert rows[1]["clip_i_masked"] == pytest.approx(cos([1, 1], [1, 0]), abs=1e-6)
    assert "dino_masked" not in rows[2]  # no mask for the generated image

    from dreamcache.apps.eval import report

    full = [{"method": "m", "subject": s, "kind": "object", **r} for s, r in zip(["dog", "dog", "can"], rows)]
    t = report.tables(full, ["m"], ["dog", "can"])["m"]
    assert t["overall"]["dino"] == pytest.approx(np.mean([r["dino"] for r in rows]), abs=1e-6)
    assert t["subjects"]["dog"]["clip_t"] == pytest.approx((rows[0]["clip_t"] + rows[1]["clip_t"]) / 2, abs=1e-6)
    assert t["overall"]["dino_masked"] == pytest.approx((rows[0]["dino_masked"] + rows[1]["dino_masked"]) / 2, abs=1e-6)
    assert t["overall"]["dino_masked_images"] == 2 and t["live"]["images"] == 0


def test_tiny_metric_models_load_from_folders_and_use_cls_and_projections(metric_models):
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel, ViTModel

    from dreamcache.apps.eval.metrics import ClipEmbedder, DinoEmbedder, cosine_rows

    dino_dir, clip_dir = metric_models
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 60), (64, 64), (90, 30))]
    d = DinoEmbedder(str(dino_dir), device="cpu", batch_size=2)
    c = ClipEmbedder(str(clip_dir), device="cpu", batch_size=2)
    got_d, got_c = d.images(ims), c.images(ims)
    vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    px = AutoImageProcessor.from_pretrained(dino_dir)(images=[Image.fromarray(i) for i in ims], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        cls = vit(pixel_values=px).last_hidden_state[:, 0]
    assert torch.allclose(got_d, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)
    assert torch.allclose(got_d.norm(dim=-1), torch.ones(3), atol=1e-6)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    px = AutoImageProcessor.from_pretrained(clip_dir)(images=[Image.fromarray(i) for i in ims], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        f = clip.get_image_features(pixel_values=px)
        f = f if isinstance(f, torch.Tensor) else f.pooler_output
    assert torch.allclose(got_c, torch.nn.functional.normalize(f, dim=-1), atol=1e-5)
    t = c.texts(["a dog in the jungle", "a red backpack", "a dog in the jungle"])
    assert t.shape == (3, 16) and torch.allclose(t[0], t[2], atol=1e-5) and not torch.allclose(t[0], t[1], atol=1e-2)
    assert float(cosine_rows(got_c[:1], got_c[:1])) == pytest.approx(1.0, abs=1e-6)


def test_missing_metric_model_is_one_clear_sentence(tmp_path, monkeypatch, metric_models):
    from dreamcache.apps.eval.cli import main
    from dreamcache.apps.eval.metrics import ClipEmbedder, DinoEmbedder

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(DreamCacheError) as e:
        DinoEmbedder(None, device="cpu")
    msg = str(e.value)
    assert "facebook/dino-vits16" in msg and "--dino" in msg and "never downloads" in msg and msg.count(". ") == 0
    with pytest.raises(DreamCacheError, match="openai/clip-vit-base-patch32 is not on this machine"):
        ClipEmbedder(None, device="cpu")
    with pytest.raises(DreamCacheError, match="--clip '.*dino' does not hold a loadable openai/clip-vit-base-patch32"):
        ClipEmbedder(str(metric_models[0]), device="cpu")
    if DREAMBENCH is not None:  # the command fails before it loads ComfyUI or a checkpoint
        rc = main(
            [
                "--checkpoint",
                "x.safetensors",
                "--baseline",
                "--dreambench",
                str(DREAMBENCH),
                "--out",
                str(tmp_path / "o"),
                "--dino",
                str(tmp_path / "no_such_folder"),
                "--comfyui",
                str(tmp_path / "no_comfy"),
            ]
        )
        assert rc == 2


# ---- real photos -------------------------------------------------------------------------------------------


@needs_dreambench
def test_real_photos_through_the_reference_preprocessing(tmp_path):
    from PIL import Image

    from dreamcache.apps.eval.generate import load_reference

    photos = sorted(DREAMBENCH.glob("*/*.jpg"))
    assert len(photos) == 60
    by_size = {}
    for f in photos:
        with Image.open(f) as im:
            by_size.setdefault(im.size, f)
    sides = sorted(w for w, _ in by_size)
    assert sides[0] == 615 and sides[-1] == 2048 and len(by_size) >= 10
    masks = tmp_path / "masks"
    for (w, h), f in sorted(by_size.items()):  # one photo of every size in the set (the CPU is shared)
        m = np.zeros((h, w), np.uint8)
        m[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = 255
        (masks / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(masks / f.parent.name / f"{f.stem}_mask.png")
        ref = load_reference(f, f.parent.name, "files", 512, "train", masks)
        assert ref.image.shape == (1, 512, 512, 3) and 0.0 <= float(ref.image.min()) and float(ref.image.max()) <= 1.0
        assert (
            ref.photo.shape == (h, w, 3)
            and ref.mask.shape == (h, w)
            and ref.mask.mean() == pytest.approx(1 / 2 * 1 / 3, abs=0.01)
        )
        # the training layout (dreamcache.core.placement): the subject's box scaled and centred on a white canvas
        from dreamcache.core.placement import subject_offset, subject_size

        bw, bh = w // 3 * 2 - w // 3, h // 4 * 3 - h // 4
        sw, sh = subject_size(bw, bh, 512)
        x0, y0 = subject_offset(512, sw, sh)
        img = ref.image[0]
        outside = torch.ones(512, 512, dtype=torch.bool)
        outside[max(0, y0 - 2): y0 + sh + 2, max(0, x0 - 2): x0 + sw + 2] = False
        assert bool((img[outside] == 1.0).all()) and x0 > 50
        assert not bool((img[y0 + 2: y0 + sh - 2, x0 + 2: x0 + sw - 2] == 1.0).all(-1).all())
    for f in photos[:3]:
        none = load_reference(f, f.parent.name, "none", 512)
        assert none.mask is None and none.image.shape[1:3] == none.photo.shape[:2]
    with pytest.raises(DreamCacheError, match="No mask for dog/00.jpg"):
        load_reference(DREAMBENCH / "dog" / "00.jpg", "dog", "files", 512, masks_dir=tmp_path)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from dreamcache.apps.eval.generate import load_reference

    yy, xx = np.mgrid[0:48, 0:80]
    pixels = np.stack([xx * 3, yy * 5, np.full_like(xx, 128)], -1).astype(np.uint8)  # smooth, so JPEG keeps it
    pixels[:, :40] = 0  # left half dark, so a wrong rotation is obvious
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    f = tmp_path / "cam" / "00.jpg"
    f.parent.mkdir()
    Image.fromarray(pixels).save(f, exif=exif, quality=98)
    ref = load_reference(f, "cam", "none", 512)
    assert ref.photo.shape == (80, 48, 3)  # displayed upright: portrait
    expected = np.rot90(pixels, k=-1)
    assert np.abs(ref.photo.astype(int) - expected.astype(int)).mean() < 3
    assert ref.photo[:40].mean() < 20 and ref.photo[40:].mean() > 80  # the dark half is on top after the rotation


def test_grid_and_markdown_with_the_paper_rows(tmp_path):
    from PIL import Image

    from dreamcache.apps.eval import report

    red = Image.new("RGB", (64, 64), (255, 0, 0))
    blue = Image.new("RGB", (64, 64), (0, 0, 255))
    img = report.grid(
        red,
        [("a dog in the jungle", [blue, blue]), ("a dog in the snow", [blue, None])],
        cell=32,
        path=tmp_path / "g.jpg",
    )
    assert img.width == 3 * 32 and (tmp_path / "g.jpg").is_file()
    px = np.asarray(img)
    assert px[16, 16, 0] > 200 and px[16, 16, 2] < 60  # reference in the first column
    assert px[16, 48, 2] > 200 and px[16, 48, 0] < 60  # a generation beside it
    row2 = img.height // 2 + 16
    assert abs(int(px[row2, 80, 0]) - 200) < 30  # a missing image is a grey cell
    assert (px[40:44, 2:60] < 128).any()  # the prompt is written under the row
    data = {
        "protocol": {"subjects": 1, "prompts_per_subject": 2, "images_per_prompt": 2, "reference": ""},
        "settings": {"mask_mode": "none"},
        "completeness": {"expected": 4, "found": 3},
        "wall_time": None,
        "methods": {
            "baseline": report.tables(
                [
                    {
                        "method": "baseline",
                        "subject": "dog",
                        "kind": "live",
                        "dino": 0.5,
                        "clip_i": 0.25,
                        "clip_t": 0.125,
                    }
                ],
                ["baseline"],
                ["dog"],
            )["baseline"]
        },
    }
    md = report.markdown(data)
    assert "| baseline | 1 | 0.500 | 0.250 | 0.125 |" in md and "INCOMPLETE" in md
    assert "| DreamCache SD1.5 (paper, Table 2) | 3000 | 0.713 | 0.810 | 0.298 |" in md
    assert "| DreamCache SD2.1 (paper, Table 2) | 3000 | 0.767 | 0.816 | 0.301 |" in md
    assert "| IP-Adapter SD1.5 (paper, Table 2) | 3000 | 0.667 | 0.813 | 0.289 |" in md
    assert "| dog | 1 | 0.500 |" in md
