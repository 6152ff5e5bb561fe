"""``python -m dreamcache.eval`` end to end in a real ComfyUI with tiny random models (SD1 U-Net, CLIP, VAE, SAM,
DINO and CLIP metric models) on two DreamBench subjects at 64 px, one sampling step.

Protects: an evaluation image is exactly what the nodes' graph makes (SubjectMask -> BuildFeatureCache ->
ApplyDreamCache -> DualGuidanceSampler -> VAEDecode) for the same seed; the "no adapter" baseline row; the outputs
(CSV row per image, tables beside the paper's Table 2, grids, wall time); the masked metrics where SAM finds the
subject; resume (a second run generates and scores nothing, a deleted image comes back identical); settings that
differ refuse the folder; shards whose union (after --merge) equals the unsharded run; the trainer's --eval-every.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamcache.apps.eval import protocol as P

ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = P.find_dreambench(None, ROOT)
RES = 64
SUBJECTS = ["backpack", "dog"]
pytestmark = pytest.mark.skipif(
    DREAMBENCH is None, reason="DreamBench not found (set DREAMBENCH_PATH or keep shared/dreambench beside the repo)"
)


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    old = torch.set_flush_denormal(True)  # tiny random models make denormals, ~100x slower on x86
    yield
    torch.set_flush_denormal(False)
    del old


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    """Tiny checkpoint, adapter file, SAM, metric models and reference masks; the loaders patched to return them."""
    pytest.importorskip("transformers", reason="the metrics use transformers (a ComfyUI requirement)")
    from types import SimpleNamespace

    from helpers import random_adapter
    from PIL import Image
    from tiny_metric_models import make_clip as make_clip_metric
    from tiny_metric_models import make_dino
    from tiny_models import make_clip, make_model, make_vae

    import dreamcache
    import dreamcache.comfy.model  # noqa: F401
    import dreamcache.core.adapter  # noqa: F401
    from dreamcache.core.adapter_io import save_adapter

    d = tmp_path_factory.mktemp("eval_env")
    ns = SimpleNamespace(model=make_model("sd1"), clip=make_clip("sd1"), vae=make_vae(), root=d)
    ns.adapter = d / "tinyadapter.safetensors"
    save_adapter(str(ns.adapter), random_adapter(dreamcache, ns.model, seed=3), family="sd1")
    ns.dino, ns.clip_dir = make_dino(d / "dino"), make_clip_metric(d / "clip")
    ns.masks = d / "masks"
    for s in SUBJECTS:
        with Image.open(DREAMBENCH / s / "00.jpg") as im:
            w, h = im.size
        m = np.zeros((h, w), np.uint8)
        m[h // 5 : 4 * h // 5, w // 4 : 3 * w // 4] = 255
        (ns.masks / s).mkdir(parents=True)
        Image.fromarray(m).save(ns.masks / s / "00_mask.png")
    return ns


@pytest.fixture
def patched(env, monkeypatch):
    """The checkpoint and SAM loaders return the tiny models; counts the sampler calls."""
    from tiny_sam import make_tiny_sam

    from dreamcache.apps.eval import generate
    from dreamcache.comfy import loading
    from dreamcache.comfy import sam as sam_glue

    monkeypatch.setattr(loading, "load_checkpoint", lambda path, dtype=None: (env.model, env.clip, env.vae))
    monkeypatch.setattr(
        sam_glue, "load_sam_model", lambda path, name: sam_glue.wrap_sam(make_tiny_sam(seed=0), "tiny", name)
    )
    calls = []
    real = generate.Generator.sample

    def counting(self, model, method, prompt, seeds):
        calls.append((method.name, prompt, tuple(seeds)))
        return real(self, model, method, prompt, seeds)

    monkeypatch.setattr(generate.Generator, "sample", counting)
    return calls


def argv(comfy, env, out, *extra, sam=True):
    a = [
        "--checkpoint",
        "tiny_sd1.safetensors",
        "--adapter",
        str(env.adapter),
        "--baseline",
        "--dreambench",
        str(DREAMBENCH),
        "--out",
        str(out),
        "--subjects",
        ",".join(SUBJECTS),
        "--prompts",
        "1",
        "--images-per-prompt",
        "2",
        "--steps",
        "1",
        "--resolution",
        str(RES),
        "--dino",
        str(env.dino),
        "--clip",
        str(env.clip_dir),
        "--masks",
        str(env.masks),
        "--comfyui",
        str(comfy),
        "--no-progress",
        "--grid-size",
        "32",
        *extra,
    ]
    return a + (["--sam", "tiny_sam.pth"] if sam else [])


def rows_of(out: Path, name: str = "all") -> list[dict]:
    with open(out / "scores" / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def images_of(out: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {str(p.relative_to(out)): np.asarray(Image.open(p)) for p in sorted((out / "images").rglob("*.png"))}


@pytest.fixture(scope="module")
def unsharded(comfy, env, tmp_path_factory):
    """One full run (2 methods x 2 subjects x 1 prompt x 2 images) shared by the tests below."""
    from tiny_sam import make_tiny_sam

    from dreamcache.apps.eval import generate
    from dreamcache.apps.eval.cli import main
    from dreamcache.comfy import loading
    from dreamcache.comfy import sam as sam_glue

    mp = pytest.MonkeyPatch()
    mp.setattr(loading, "load_checkpoint", lambda path, dtype=None: (env.model, env.clip, env.vae))
    mp.setattr(sam_glue, "load_sam_model", lambda path, name: sam_glue.wrap_sam(make_tiny_sam(seed=0), "tiny", name))
    out = tmp_path_factory.mktemp("eval_unsharded")
    try:
        rc = main(argv(comfy, env, out))
    finally:
        mp.undo()
    assert rc == 0
    assert generate  # imported for the monkeypatch fixture's module
    return out


def test_a_run_writes_images_scores_tables_and_grids(unsharded, env):
    out = unsharded
    imgs = images_of(out)
    assert len(imgs) == 8 and all(a.shape == (RES, RES, 3) for a in imgs.values())
    rows = rows_of(out)
    proto = P.load_protocol(DREAMBENCH, SUBJECTS, 1, 2)
    expected = {
        (it.method, it.subject, it.prompt_index, it.image_index): it for it in proto.items(["baseline", "tinyadapter"])
    }
    assert len(rows) == 8
    for r in rows:
        it = expected[(r["method"], r["subject"], int(r["prompt_index"]), int(r["image_index"]))]
        assert (
            int(r["seed"]) == it.seed
            and r["file"] == it.file
            and r["prompt"] == it.prompt
            and (out / r["file"]).is_file()
        )
        assert r["kind"] == ("live" if r["subject"] == "dog" else "object")
        for k in ("dino", "clip_i", "clip_t"):
            assert -1.0 <= float(r[k]) <= 1.0
    # the baseline is the same seeds without the adapter (with no adapter effect, combined guidance would equal CFG)
    for s in SUBJECTS:
        a = imgs[f"images/baseline/{s}/p00_0.png"].astype(int)
        b = imgs[f"images/tinyadapter/{s}/p00_0.png"].astype(int)
        assert np.abs(a - b).mean() > 0.05
    data = json.loads((out / "results.json").read_text())
    assert data["completeness"] == {"expected": 8, "found": 8, "missing_examples": []}
    assert set(data["methods"]) == {"baseline", "tinyadapter"}
    for m in ("baseline", "tinyadapter"):
        mine = [r for r in rows if r["method"] == m]
        assert data["methods"][m]["overall"]["images"] == 4
        assert data["methods"][m]["overall"]["dino"] == pytest.approx(
            np.mean([float(r["dino"]) for r in mine]), abs=1e-6
        )
        assert data["methods"][m]["subjects"]["dog"]["images"] == 2 and data["methods"][m]["live"]["images"] == 2
    assert [r["dino"] for r in data["paper_table2"]] == [0.713, 0.767, 0.667]
    assert data["settings"]["sampling"]["steps"] == 1 and data["settings"]["mask_mode"] == "files"
    assert data["wall_time"]["generated"] == 8 and data["wall_time"]["seconds"] > 0
    md = (out / "results.md").read_text()
    assert "| tinyadapter | 4 |" in md and "| baseline | 4 |" in md and "DreamCache SD2.1 (paper, Table 2)" in md
    for m in ("baseline", "tinyadapter"):
        for s in SUBJECTS:
            from PIL import Image

            with Image.open(out / "grids" / m / f"{s}.jpg") as g:
                assert g.width == 3 * 32
    ref = out / "references" / "dog.png"
    assert ref.is_file() and (out / "references" / "dog_mask.png").is_file()


def test_masked_metrics_where_sam_finds_the_subject(unsharded, comfy):
    from tiny_sam import make_tiny_sam

    from dreamcache.apps.eval.generate import Segmenter
    from dreamcache.comfy import sam as sam_glue

    seg = Segmenter(sam_glue.wrap_sam(make_tiny_sam(seed=0), "tiny", "tiny"))
    imgs = images_of(unsharded)
    found = 0
    for r in rows_of(unsharded):
        has = bool(seg.mask(imgs[r["file"]]).any())
        assert (r["dino_masked"] != "") == has and (r["clip_i_masked"] != "") == has
        found += has
        if has:
            assert -1.0 <= float(r["dino_masked"]) <= 1.0
    assert found > 0, "the tiny SAM found no subject in any image: this test checks nothing"
    data = json.loads((unsharded / "results.json").read_text())
    assert (
        data["methods"]["baseline"]["overall"]["dino_masked_images"]
        + data["methods"]["tinyadapter"]["overall"]["dino_masked_images"]
        == found
    )


def test_resume_generates_and_scores_nothing_new(unsharded, comfy, env, patched, capsys, tmp_path):
    import shutil

    from dreamcache.apps.eval.cli import main

    out = tmp_path / "copy"
    shutil.copytree(unsharded, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    scores = (out / "scores" / "all.csv").read_text()
    assert main(argv(comfy, env, out)) == 0
    assert patched == [] and "0 images generated, 0 scored" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    assert (out / "scores" / "all.csv").read_text() == scores
    # a lost image is made again, identically, and scored again
    lost = out / "images" / "tinyadapter" / "dog" / "p00_1.png"
    old = images_of(out)["images/tinyadapter/dog/p00_1.png"]
    lost.unlink()
    assert main(argv(comfy, env, out)) == 0
    assert len(patched) == 1 and patched[0][0] == "tinyadapter" and patched[0][1] == "a dog in the jungle"
    assert np.array_equal(images_of(out)["images/tinyadapter/dog/p00_1.png"], old)
    assert "1 images generated, 1 scored" in capsys.readouterr().out
    # the same scores (the metric models' batch differs, so the last digit may too)
    again, first = rows_of(out), list(csv.DictReader(scores.splitlines()))
    assert [r["file"] for r in again] == [r["file"] for r in first]
    for a, b in zip(again, first):
        for k in ("dino", "clip_i", "clip_t", "dino_masked", "clip_i_masked"):
            assert (a[k] == "") == (b[k] == "") and (a[k] == "" or float(a[k]) == pytest.approx(float(b[k]), abs=1e-5))
    # other settings on the same folder would mix two runs: refused
    assert main(argv(comfy, env, out, "--image-scale", "3")) == 2
    assert "holds images made with other settings: sampling" in capsys.readouterr().err


def test_shards_and_merge_equal_the_unsharded_run(unsharded, comfy, env, patched, capsys, tmp_path):
    from dreamcache.apps.eval.cli import main

    out = tmp_path / "sharded"
    for i in (1, 2):
        assert main(argv(comfy, env, out, "--shard", f"{i}/2")) == 0
    assert not (out / "results.json").exists()  # shards write no tables
    first, second = rows_of(out, "shard-001-of-002"), rows_of(out, "shard-002-of-002")
    assert len(first) == len(second) == 4 and not {r["file"] for r in first} & {r["file"] for r in second}
    assert main(["--out", str(out), "--merge", "--grid-size", "32"]) == 0
    assert "8 of 8 images scored" in capsys.readouterr().out
    a, b = images_of(out), images_of(unsharded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    key = lambda r: r["file"]  # noqa: E731
    sharded = sorted(first + second, key=key)
    whole = sorted(rows_of(unsharded), key=key)
    for r, w in zip(sharded, whole):
        assert {k: r[k] for k in ("method", "subject", "prompt", "seed", "file")} == {
            k: w[k] for k in ("method", "subject", "prompt", "seed", "file")
        }
        for k in ("dino", "clip_i", "clip_t", "dino_masked", "clip_i_masked"):
            assert (r[k] == "") == (w[k] == "") and (r[k] == "" or float(r[k]) == pytest.approx(float(w[k]), abs=1e-5))
    ja, jb = json.loads((out / "results.json").read_text()), json.loads((unsharded / "results.json").read_text())
    for m in ("baseline", "tinyadapter"):
        for k in ("dino", "clip_i", "clip_t"):
            assert ja["methods"][m]["overall"][k] == pytest.approx(jb["methods"][m]["overall"][k], abs=1e-5)
    assert ja["wall_time"]["runs"] == 2 and (out / "grids" / "tinyadapter" / "dog.jpg").is_file()


def test_an_eval_image_is_what_the_nodes_make(unsharded, pack, env):
    """The same subject, prompt and seed through the real node graph give the same pixels."""
    from helpers import run_node

    from dreamcache.apps.data import load_mask, load_rgb
    from dreamcache.core.image import from_uint8, to_uint8

    it = next(i for i in P.load_protocol(DREAMBENCH, ["dog"], 1, 2).items(["tinyadapter"]) if i.image_index == 1)
    photo = from_uint8(load_rgb(DREAMBENCH / "dog" / "00.jpg"))
    mask = torch.from_numpy(load_mask(env.masks / "dog" / "00_mask.png")).float()[None]
    reference, _ = run_node(
        "DreamCacheSubjectMask", image=photo, prompt_mode="mask", mask=mask, layout="train", size=RES
    )
    adapter = pack.dreamcache.core.adapter_io.read_adapter(str(env.adapter))
    cache, _ = run_node(
        "DreamCacheBuildFeatureCache",
        model=env.model,
        vae=env.vae,
        image=reference,
        clip=env.clip,
        adapter=adapter,
        seed=0,
        resolution=RES,
        fit="pad",
        batch_mode="concat",
    )
    (model,) = run_node("DreamCacheApply", model=env.model, adapter=adapter, cache=cache, strength=1.0)
    (pos,) = run_node("CLIPTextEncode", clip=env.clip, text=it.prompt)
    (neg,) = run_node("CLIPTextEncode", clip=env.clip, text="")
    (latent,) = run_node("EmptyLatentImage", width=RES, height=RES, batch_size=1)
    (samples,) = run_node(
        "DreamCacheDualGuidanceSampler",
        model=model,
        positive=pos,
        negative=neg,
        latent_image=latent,
        seed=it.seed,
        steps=1,
        sampler_name="ddim",
        scheduler="ddim_uniform",
        denoise=1.0,
        text_scale=7.5,
        image_scale=0.4,
        mode="combined",
    )
    (pixels,) = run_node("VAEDecode", samples=samples, vae=env.vae)
    assert np.array_equal(to_uint8(pixels[0]), images_of(unsharded)[it.file])


def test_trainer_eval_every_scores_into_its_log_and_leaves_training_unchanged(comfy, env, tmp_path):
    from synthetic_data import make_dataset

    from dreamcache.apps.train.config import TrainConfig, build_parser, config_from_args
    from dreamcache.apps.train.evaluation import eval_dir, eval_log_path
    from dreamcache.apps.train.loop import Trainer

    data = make_dataset(tmp_path / "data", objects=2, images=2, size=RES)
    base = dict(
        data=str(data),
        steps=2,
        batch_size=1,
        resolution=RES,
        num_workers=0,
        progress=False,
        lr=1e-3,
        save_every=0,
        seed=0,
    )
    plain = Trainer(
        env.model, env.clip, env.vae, TrainConfig(out=str(tmp_path / "plain.safetensors"), **base), log=lambda *a: None
    )
    plain_losses = plain.run()
    logged = []
    cfg = TrainConfig(
        out=str(tmp_path / "run" / "ev.safetensors"),
        eval_every=1,
        eval_dreambench=str(DREAMBENCH),
        eval_subjects=["dog"],
        eval_prompts=1,
        eval_steps=1,
        eval_dino=str(env.dino),
        eval_clip=str(env.clip_dir),
        **base,
    )
    t = Trainer(env.model, env.clip, env.vae, cfg, log=logged.append)
    losses = t.run()
    assert losses == plain_losses  # evaluating does not touch the training's random state
    with open(eval_log_path(cfg.out), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"] and all(r["images"] == "1" for r in rows)
    assert all(-1.0 <= float(r[k]) <= 1.0 for r in rows for k in ("dino", "clip_i", "clip_t"))
    assert rows[0]["dino"] != rows[1]["dino"]  # the adapter moved between the steps, and the scores follow it
    assert sum(line.startswith("eval at step ") for line in logged) == 2
    assert (eval_dir(cfg.out, 2) / "grids" / "step000002" / "dog.jpg").is_file()
    # the command line reaches the config, and a missing DreamBench or metric model fails before training
    args = build_parser().parse_args(["--eval-every", "5", "--eval-subjects", "dog,can", "--eval-prompts", "3"])
    got = config_from_args(args, TrainConfig(data="d", out="o"))
    assert (got.eval_every, got.eval_subjects, got.eval_prompts) == (5, ["dog", "can"], 3)
    from dreamcache.core.errors import DreamCacheError

    with pytest.raises(DreamCacheError, match="--eval-dino '.*nothing' is not a folder"):
        Trainer(
            env.model,
            env.clip,
            env.vae,
            TrainConfig(
                out=str(tmp_path / "x.safetensors"),
                eval_every=1,
                eval_dreambench=str(DREAMBENCH),
                eval_dino=str(tmp_path / "nothing"),
                **base,
            ),
            log=lambda *a: None,
        )
