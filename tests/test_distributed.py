"""Data-parallel training (2 Gloo ranks on the CPU, tiny SD1 model) and sharded dataset synthesis.

Protects: 2 ranks x batch 2 train the same adapter as 1 process x batch 4 (fp32, max abs <= 1e-6, same data
order); resuming 2 -> 1 and 1 -> 2 ranks equals the straight run; only rank 0 writes files; out of memory on one
rank and a rank that dies stop the run with a non-zero exit and a message naming the rank (no hang); the rank
data order, the global-batch arithmetic and the setup errors (no GPU for a rank, NCCL missing). Synthesis: the
union of N shards is the unsharded run's items (and pictures), shards are resumable, rejections are merged, the
merged folder passes ``data check``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synthetic_data import make_dataset

ROOT = Path(__file__).resolve().parents[1]
RES = 64
STEPS = 2
TOL = 1e-6


# ---- no processes: data order, batch arithmetic, setup errors ----------------------------------------------------


def test_rank_positions_split_every_global_batch_of_the_single_process_order():
    from dreamcache.apps.train.parallel import RankPositionSampler

    def rank_positions(start, rank, world_size, batch_size, micro_batches):
        it = iter(RankPositionSampler(start, rank, world_size, batch_size))
        return [[next(it) for _ in range(batch_size)] for _ in range(micro_batches)]

    world, batch, accumulate, steps = 2, 2, 3, 4
    g = world * batch * accumulate
    per_rank = [rank_positions(g, r, world, batch, accumulate * steps) for r in range(world)]  # resumed at step 1
    single = rank_positions(g, 0, 1, world * batch, accumulate * steps)
    assert single[0] == list(range(g, g + world * batch))  # one rank: consecutive positions, as today
    for s in range(steps):
        step = sorted(p for r in range(world) for mb in per_rank[r][s * accumulate : (s + 1) * accumulate] for p in mb)
        assert step == list(range(g * (s + 1), g * (s + 2)))  # step s of the run = positions s*G .. s*G+G-1
        assert step == sorted(p for mb in single[s * accumulate : (s + 1) * accumulate] for p in mb)
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))


def _ns(**kw):
    return argparse.Namespace(**kw)


def test_global_batch_is_kept_across_world_sizes_and_must_split():
    from dreamcache.apps.train.batch import resolve_batch
    from dreamcache.apps.train.config import TrainConfig
    from dreamcache.core.errors import DreamCacheError

    saved = TrainConfig(batch_size=2, accumulate=1)  # saved by 2 ranks: global batch 4
    a = _ns()
    resolve_batch(a, saved, world_size=1, saved_world_size=2)
    assert (a.batch_size, a.accumulate) == (2, 2)  # keeps the per-rank micro-batch, accumulates instead
    b = _ns()
    resolve_batch(b, TrainConfig(batch_size=4, accumulate=1), world_size=2, saved_world_size=1)
    assert (b.batch_size, b.accumulate) == (2, 1)
    c = _ns(batch_size=1)
    resolve_batch(c, TrainConfig(batch_size=4, accumulate=1), world_size=2, saved_world_size=1)
    assert (c.batch_size, c.accumulate) == (1, 2)
    same = _ns()
    resolve_batch(same, TrainConfig(batch_size=3, accumulate=2), world_size=1, saved_world_size=1)
    assert not vars(same)  # a plain resume changes nothing
    with pytest.raises(DreamCacheError, match="does not split over 3 ranks"):
        resolve_batch(_ns(), saved, world_size=3, saved_world_size=2)
    with pytest.raises(DreamCacheError, match="keeps its global batch of 4"):
        resolve_batch(_ns(global_batch=8), saved, world_size=2, saved_world_size=2)
    fresh = _ns(global_batch=128, batch_size=8)
    resolve_batch(fresh, None, world_size=4)
    assert (fresh.batch_size, fresh.accumulate) == (8, 4)
    with pytest.raises(DreamCacheError, match="global batch of 130 images does not split over 4 ranks"):
        resolve_batch(_ns(global_batch=130), None, world_size=4)
    with pytest.raises(DreamCacheError, match="--batch-size 3 does not divide"):
        resolve_batch(_ns(global_batch=16, batch_size=3), None, world_size=2)
    untouched = _ns(batch_size=2)
    resolve_batch(untouched, None, world_size=4)
    assert vars(untouched) == {
        "batch_size": 2
    }  # without --global-batch, ranks x batch x accumulate is the global batch


def test_setup_errors_name_the_rank(monkeypatch):
    import torch.distributed as dist

    from dreamcache.apps.train import parallel as distributed
    from dreamcache.core.errors import DreamCacheError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.setup("auto").enabled  # no launcher: the plain single-process trainer
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        DreamCacheError,
        match=r"rank 3 of 4 \(local rank 3 on .*\) has no GPU: .* has 2 CUDA GPU\(s\).*--nproc_per_node 2",
    ):
        distributed.setup("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        DreamCacheError, match="rank 3 of 4 .* has no GPU: PyTorch on .* sees no CUDA device.*--device cpu"
    ):
        distributed.setup("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(DreamCacheError, match="rank 3 of 4 .*: this PyTorch build has no NCCL.*--dist-backend gloo"):
        distributed.setup("auto")
    with pytest.raises(DreamCacheError, match="NCCL needs CUDA GPUs but --device cpu"):
        distributed.setup("cpu", "nccl")
    monkeypatch.setenv("RANK", "7")
    with pytest.raises(DreamCacheError, match="inconsistent"):
        distributed.setup("cpu")


# ---- two Gloo ranks ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(spec: dict, tmp: Path, models, world: int = 2):
    """Start ``world`` ranks of tests/dist_worker.py with torchrun's environment contract, forked from this process
    (which has imported ComfyUI and built ``models``: a fresh process would need ~15 s for that on this machine),
    or as new processes where fork does not exist."""
    import multiprocessing

    import dist_worker

    port = _free_port()
    if "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")
        procs = [
            ctx.Process(target=dist_worker.forked_rank, args=(r, world, port, spec, str(tmp / f"rank{r}.err"), models))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        return procs
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    procs = []
    for r in range(world):
        env = dict(
            os.environ,
            RANK=str(r),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(r),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        with open(tmp / f"rank{r}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(spec_path)],
                    cwd=ROOT,
                    env=env,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _wait(procs, tmp: Path, timeout: float = 240):
    """Wait for every rank (killing all of them if one hangs); exit codes, logs, result files, seconds."""
    t0 = time.monotonic()
    world = len(procs)
    codes = []
    for p in procs:
        left = max(1.0, timeout - (time.monotonic() - t0))
        if isinstance(p, subprocess.Popen):
            try:
                codes.append(p.wait(timeout=left))
            except subprocess.TimeoutExpired:
                pass
        else:
            p.join(left)
            codes.append(p.exitcode)
        if len(codes) < procs.index(p) + 1 or codes[-1] is None:
            for q in procs:
                q.kill()
            logs = " | ".join((tmp / f"rank{r}.err").read_text()[-2000:] for r in range(world))
            pytest.fail(f"the ranks hung (> {timeout} s); logs: {logs}")
    logs = [(tmp / f"rank{r}.err").read_text() for r in range(world)]
    results = [
        json.loads((tmp / f"result.rank{r}.json").read_text()) if (tmp / f"result.rank{r}.json").exists() else None
        for r in range(world)
    ]
    return codes, logs, results, time.monotonic() - t0


def _adapter(path):
    from dreamcache.core.adapter_io import read_adapter

    af = read_adapter(str(path))
    return {(str(ref), k): v for ref in af.layers for k, v in af.tensors[ref].items()}


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _train_in_process(monkeypatch, models, argv):
    from dreamcache.apps.train import cli as train_cli
    from dreamcache.comfy import loading

    monkeypatch.setattr(loading, "load_checkpoint", lambda path, dtype=None: models)
    torch.set_flush_denormal(True)  # as the CLI does on the CPU (tiny random models make denormals)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): on a loaded machine 2 threads spin and wait
    try:
        return train_cli.main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def test_two_ranks_equal_one_process_resume_across_world_sizes_and_failures(comfy, tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", objects=4, images=2, size=RES)
    runs = tmp_path / "runs"
    machine = f"--num-workers 0 --no-progress --device cpu --comfyui {comfy}".split()
    common = f"--checkpoint tiny.safetensors --data {data} --resolution {RES} --lr 1e-3 --init reference".split()
    common += machine
    dt = ["--dist-timeout", "60"]
    straight = runs / "straight" / "a.safetensors"  # the reference: one process, batch 4
    one_two, two = runs / "one_two", runs / "two" / "a.safetensors"
    ready = tmp_path / "straight.ready"
    first = str(one_two / "a-step000001.safetensors")  # the reference's checkpoint at step 1

    def scenario(name, out, *argv, **kw):
        return {"name": name, "argv": [*argv, "--out", str(out), *dt], **kw}

    spec = {"timeout": 120, "watch": str(runs), "result": str(tmp_path / "result"), "scenarios": [
        scenario("2x2", two, *common, "--steps", str(STEPS), "--batch-size", "2", "--save-every", "1"),
        scenario("resume 1->2", one_two / "a.safetensors", "--resume", first, *machine, wait_for=str(ready)),
        scenario("init-from", runs / "init_from" / "a.safetensors", *common, "--init-from", first, "--steps", "1",
                 "--batch-size", "2"),
        scenario("ranks disagree", runs / "disagree" / "a.safetensors", *common, "--steps", "1", "--batch-size", "2",
                 extra_rank1=["--seed", "1"]),
        scenario("oom on rank 1", runs / "oom" / "a.safetensors", *common, "--steps", "1", "--batch-size", "2",
                 oom_rank=1),
        scenario("rank 1 dies", runs / "crash" / "a.safetensors", *common, "--steps", "1", "--batch-size", "2",
                 crash_rank=1),
    ]}  # fmt: skip
    t1 = time.monotonic()
    from tiny_models import make_clip, make_model, make_vae

    tiny_sd1 = make_model("sd1"), make_clip("sd1"), make_vae()  # the ranks get copies of these (fork)
    models_s = time.monotonic() - t1
    t0 = time.monotonic()
    ranks = _start(spec, tmp_path, tiny_sd1)
    try:  # meanwhile, the reference run (with a checkpoint at step 1 for the 1 -> 2 resume and --init-from)
        argv = [*common, "--out", str(straight), "--steps", str(STEPS), "--batch-size", "4", "--save-every", "1"]
        assert _train_in_process(monkeypatch, tiny_sd1, argv) == 0, capsys.readouterr().err
        one_two.mkdir(parents=True)
        for name in ("a-step000001.safetensors", "a-step000001.state.safetensors"):
            shutil.copy(straight.parent / name, one_two / name)
        ready.touch()
        argv = [*common, "--out", str(runs / "init_from_1" / "a.safetensors"), "--init-from", first, "--steps", "1",
                "--batch-size", "4"]  # fmt: skip
        assert _train_in_process(monkeypatch, tiny_sd1, argv) == 0, capsys.readouterr().err
    except BaseException:
        for p in ranks:
            p.kill()
        raise
    straight_s = time.monotonic() - t0
    codes, logs, results, seconds = _wait(ranks, tmp_path)
    print(f"tiny models {models_s:.1f} s, reference runs {straight_s:.1f} s, then waited {seconds:.1f} s for the ranks")
    assert results[0] is not None and results[1] is not None, logs
    rc0 = {r["name"]: r["rc"] for r in results[0]["results"]}
    rc1 = {r["name"]: r["rc"] for r in results[1]["results"]}
    for name in ("2x2", "resume 1->2", "init-from"):
        assert rc0[name] == rc1[name] == 0, (name, logs)

    # 2 ranks x batch 2 == 1 process x batch 4
    ref = _adapter(straight)
    assert _max_diff(_adapter(two), ref) <= TOL
    assert _max_diff(_adapter(one_two / "a.safetensors"), ref) <= TOL
    step1 = _adapter(straight.parent / "a-step000001.safetensors")
    assert _max_diff(_adapter(two.parent / "a-step000001.safetensors"), step1) <= TOL
    assert _max_diff(_adapter(two), step1) > 1e-4  # the steps did change it
    init_from = _adapter(runs / "init_from" / "a.safetensors")
    assert _max_diff(init_from, _adapter(runs / "init_from_1" / "a.safetensors")) <= TOL
    assert _max_diff(init_from, step1) > 1e-4
    rows, rows_ref = _csv(two.parent / "a.loss.csv"), _csv(straight.parent / "a.loss.csv")
    assert [r["step"] for r in rows] == ["1", "2"]
    for r, s in zip(rows, rows_ref):  # the logged loss is the global mean
        assert abs(float(r["loss"]) - float(s["loss"])) <= 1e-5 * abs(float(s["loss"])), (r, s)
        for k in ("images_per_second", "rank0_images_per_second", "rank1_images_per_second"):
            assert float(r[k]) > 0
        assert r["peak_gpu_mib"] == "" and r["rank1_peak_gpu_mib"] == ""  # CPU ranks: no GPU memory
    assert "peak_gpu_mib" in rows_ref[0] and "rank0_images_per_second" not in rows_ref[0]
    from dreamcache.apps.train.config import load_state

    st = load_state(str(two.parent / "a-step000001.state.safetensors"))
    assert (st.extra["world_size"], st.extra["global_batch"], st.extra["positions_consumed"]) == (2, 4, 4)
    assert "throughput:" in logs[0] and "images/s over 2 rank(s)" in logs[0] and "done: 2 steps" in logs[0]
    assert "done:" not in logs[1] and "throughput:" not in logs[1]

    # only rank 0 wrote files (the audit hook saw rank 0's writes, so it would have seen rank 1's)
    assert results[1]["writes"] == [], results[1]["writes"]
    assert any("a-step000001.safetensors" in w for w in results[0]["writes"])
    assert any("a.loss.csv" in w for w in results[0]["writes"])

    # resume 2 -> 1: the 2-rank checkpoint of step 1, continued by one process (batch 2 x accumulate 2)
    two_one = runs / "two_one"
    two_one.mkdir()
    for name in ("a-step000001.safetensors", "a-step000001.state.safetensors"):
        shutil.copy(two.parent / name, two_one / name)
    argv = ["--resume", str(two_one / "a-step000001.safetensors"), "--out", str(two_one / "a.safetensors"), *machine]
    assert _train_in_process(monkeypatch, tiny_sd1, argv) == 0, capsys.readouterr().err
    assert _max_diff(_adapter(two_one / "a.safetensors"), ref) <= TOL
    assert load_state(str(two_one / "a.state.safetensors")).config.accumulate == 2

    # ranks that were given different settings stop before the first step, both naming rank 1
    assert rc0["ranks disagree"] == rc1["ranks disagree"] == 2
    for log in logs:
        assert "rank(s) 1 differ from rank 0 in their settings" in log.split("=== scenario ranks disagree")[1]
    assert not (runs / "disagree" / "a.safetensors").exists()
    # out of memory on rank 1: both ranks stop at step 1 with a message naming rank 1
    assert rc0["oom on rank 1"] == 2 and rc1["oom on rank 1"] == 2
    assert "rank 0 of 2" in logs[0] and "rank 1 ran out of GPU memory at step 1" in logs[0]
    assert "error: rank 1 of 2" in logs[1] and "Out of memory at batch size 2" in logs[1]
    # a rank that dies: the other stops (no hang) with a non-zero exit and a message
    assert codes[1] == 3 and "rank 1 dies" not in rc1
    assert codes[0] == 2 and rc0["rank 1 dies"] == 2
    died = logs[0].split("=== scenario rank 1 dies")[1]
    assert "lost contact with the other ranks in the all-reduce of step 1" in died
    assert "=== end" in logs[0] and "=== end" not in logs[1]
    assert not (runs / "crash" / "a.safetensors").exists()


def test_cli_flags_and_plain_resume_with_another_split(tmp_path):
    """The CLI knows the distributed options; a single-process resume may change batch x accumulate but not the
    global batch (before this, any change of --batch-size was refused)."""
    from dreamcache.apps.train import config as T
    from dreamcache.core.errors import DreamCacheError

    help_text = T.build_parser().format_help()
    for flag in ("--global-batch", "--dist-timeout", "--dist-backend"):
        assert flag in help_text
    saved = T.TrainConfig(data="/d", out="o.safetensors", checkpoint="c", batch_size=2, accumulate=2, steps=10)
    p = T.build_parser()
    cfg = T.config_from_args(p.parse_args(["--batch-size", "4"]), saved)
    assert (cfg.batch_size, cfg.accumulate) == (4, 1)
    with pytest.raises(DreamCacheError, match="--batch-size 3 does not divide"):
        T.config_from_args(p.parse_args(["--batch-size", "3"]), saved)
    cfg = T.config_from_args(
        p.parse_args(["--global-batch", "8", "--batch-size", "2", "--checkpoint", "c", "--data", "d", "--out", "o"])
    )
    assert (cfg.batch_size, cfg.accumulate) == (2, 4)


# ---- sharded synthesis ------------------------------------------------------------------------------------------


class _StubClip:
    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1, 1, 1), {}]]


def _stub_render(calls):
    """A fast stand-in for ComfyUI's sampler: the picture depends only on the item's seed (as a real one does)."""

    def render(model, clip, vae, prompt, s, seed, negative_cond=None):
        calls.append((prompt, seed))
        g = torch.Generator().manual_seed(seed)
        img = torch.ones(s.height, s.width, 3)
        img[8:40, 12:44] = torch.rand(3, generator=g) * 0.8
        return img

    return render


def _masker(rgb, caption):
    if "kite" in caption:  # rejected: no subject
        return torch.zeros(rgb.shape[:2], dtype=torch.bool)
    return (rgb < 0.9).any(-1)


def _items(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.parent != root
    }


def test_sharded_synthesis_equals_the_unsharded_run_and_resumes(comfy, tmp_path, monkeypatch, capsys):
    from dreamcache.apps import data as D
    from dreamcache.apps.data import cli as DC
    from dreamcache.apps.data import synth
    from dreamcache.apps.data.sharding import synth_shard
    from dreamcache.core.errors import DreamCacheError

    calls = []
    monkeypatch.setattr(synth, "render", _stub_render(calls))
    captions = ["a red mug", "a green car", "a yellow kite", "a blue box", "a brown dog", "a white kite"]
    s = D.SynthSettings(width=RES, height=RES, steps=2, images_per_caption=2, seed=5)
    whole = tmp_path / "whole"
    got = synth.synthesize(None, _StubClip(), None, captions, whole, _masker, s, progress=False)
    assert got == {"written": 8, "skipped": 0, "rejected": 4}
    merged = tmp_path / "sharded"
    counts = [
        synth.synthesize(None, _StubClip(), None, captions, merged, _masker, s, progress=False, shard=(i, 3))
        for i in range(3)
    ]
    assert [c["written"] + c["rejected"] for c in counts] == [4, 4, 4]  # round-robin: balanced
    assert sum(c["written"] for c in counts) == 8 and sum(c["rejected"] for c in counts) == 4
    assert _items(merged) == _items(whole)  # same files, same pictures (per-item seeds), no collisions

    def rejected(root):
        lines = (root / synth.REJECTED).read_text().splitlines()
        return sorted((d["object_id"], d["n"]) for d in map(json.loads, lines))

    assert rejected(merged) == rejected(whole) and len(rejected(merged)) == 4
    assert sorted(p.name for p in merged.glob("synth_rejected*")) == [  # shard 0 got no kite
        "synth_rejected-shard1of3.jsonl",
        "synth_rejected-shard2of3.jsonl",
        "synth_rejected.jsonl",
    ]
    assert DC.main(["check", str(merged), "--no-progress"]) == 0
    assert "6 objects" not in capsys.readouterr().out  # (the two kite captions were rejected: 4 objects remain)
    # a shard run again renders nothing and skips its finished (and rejected) items
    n = len(calls)
    assert synth.synthesize(None, _StubClip(), None, captions, merged, _masker, s, progress=False, shard=(1, 3)) == {
        "written": 0,
        "skipped": 4,
        "rejected": 0,
    }
    assert len(calls) == n
    # an interrupted shard finishes the rest: remove one of shard 2's items (job 8: "a brown dog", picture 0)
    for f in (merged / D.object_id_for("a brown dog")).glob("0_*"):
        f.unlink()
    again = synth.synthesize(None, _StubClip(), None, captions, merged, _masker, s, progress=False, shard=(2, 3))
    assert again == {"written": 1, "skipped": 3, "rejected": 0} and _items(merged) == _items(whole)
    # every shard must render with the same settings
    with pytest.raises(DreamCacheError, match="other settings"):
        synth.synthesize(
            None,
            _StubClip(),
            None,
            captions,
            merged,
            _masker,
            D.SynthSettings(width=RES, height=RES, steps=3, images_per_caption=2, seed=5),
            progress=False,
            shard=(0, 3),
        )
    # --shard and torchrun's environment
    assert synth_shard("2/4", {}) == (2, 4) and synth_shard(None, {"WORLD_SIZE": "8", "RANK": "5"}) == (5, 8)
    assert synth_shard("1/2", {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}) == (7, 8)
    assert synth_shard(None, {}) is None
    with pytest.raises(DreamCacheError, match="--shard '4/4'"):
        synth_shard("4/4", {})


def test_synth_cli_shard_flag(comfy, tmp_path, monkeypatch, capsys):
    from dreamcache.apps.data import cli as DC
    from dreamcache.apps.data import synth
    from dreamcache.comfy import loading

    calls = []
    monkeypatch.setattr(synth, "render", _stub_render(calls))
    monkeypatch.setattr(loading, "load_checkpoint", lambda path, dtype=None: (None, _StubClip(), None))
    caps = tmp_path / "caps.txt"
    caps.write_text("a red mug\na tree\na blue box\n")
    base = [
        "synth",
        "--checkpoint",
        "x.safetensors",
        "--out",
        str(tmp_path / "ds"),
        "--captions",
        str(caps),
        "--masks",
        "none-white-bg",
        "--width",
        str(RES),
        "--height",
        str(RES),
        "--comfyui",
        str(comfy),
        "--cpu",
        "--no-progress",
    ]
    assert DC.main([*base, "--shard", "0/2"]) == 0
    out = capsys.readouterr().out
    assert "2 written" in out and "shard 0/2" in out and len(calls) == 2
    assert DC.main([*base, "--shard", "1/2"]) == 0 and len(calls) == 3
    assert DC.main(["check", str(tmp_path / "ds"), "--no-progress"]) == 0
    assert DC.main([*base, "--shard", "2/2"]) == 2
    assert "--shard '2/2'" in capsys.readouterr().err


def test_docs_give_the_commands_and_every_option():
    """docs/training-distributed.md has the 1-GPU, 4-GPU and 2-machine commands and explains every option added
    for several processes; the README links it."""
    from dreamcache.apps.data import cli as DC
    from dreamcache.apps.train import config as T

    text = (ROOT / "docs" / "training-distributed.md").read_text()
    assert "torchrun --standalone --nproc_per_node 4 -m dreamcache.train" in text
    assert "torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint" in text
    assert "python -m dreamcache.train --checkpoint" in text and "synth --shard $i/4" in text
    for flag in ("--global-batch", "--dist-timeout", "--dist-backend"):
        assert f"`{flag}`" in text and flag in T.build_parser().format_help()
    assert "--shard" in DC.build_parser()._subparsers._group_actions[0].choices["synth"].format_help()
    assert "no GPU" in text and "12 images/s" in text
    assert "docs/training-distributed.md" in (ROOT / "README.md").read_text()
