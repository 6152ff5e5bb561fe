"""One rank of the data-parallel training tests (tests/test_distributed.py starts two of these: forked from the
test process, which has imported ComfyUI and built the tiny models already, or as ``python tests/dist_worker.py``).

The test sets torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) itself instead
of running torchrun, so that a rank can die without a launcher killing the survivor: what the survivor does then is
the trainer's own behaviour. The rank joins one Gloo process group, then runs ``python -m dreamcache.train``'s
``main`` once per scenario of the JSON spec (the group is reused, as ``setup`` allows), with the checkpoint loader
replaced by the tiny seeded models of tests/tiny_models.py. Scenario options: ``wait_for`` (a file to wait
for), ``extra_rankN`` (more arguments for rank N only), ``oom_rank`` (that rank's loss raises
CUDA's out-of-memory error), ``crash_rank`` (that rank dies with os._exit(3) in its first loss, like a segfault).
Every file operation under ``watch`` is recorded (audit hook) so the test can see which rank wrote files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if os.environ.get("COMFYUI_PATH"):
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
sys.path[1:1] = [str(ROOT), str(TESTS)]

WRITES: list[str] = []
T0 = time.monotonic()


def _audit(watch: str):
    import os as _os

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, _os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT)
            )
            if writing and _os.fsdecode(args[0]).startswith(watch):
                WRITES.append(f"{event} {_os.fsdecode(args[0])}")
        elif event in ("os.rename", "os.remove", "os.mkdir") and args:
            paths = [
                _os.fsdecode(a)
                for a in args[: 2 if event == "os.rename" else 1]
                if isinstance(a, (str, bytes, _os.PathLike))
            ]
            if any(p.startswith(watch) for p in paths):
                WRITES.append(f"{event} {' -> '.join(paths)}")

    sys.addaudithook(hook)


def forked_rank(rank: int, world: int, port: int, spec: dict, log_path: str, models=None):
    """Entry of a rank forked from the test process (ComfyUI already imported, ``models`` already built): sets
    torchrun's environment variables, sends stdout/stderr to ``log_path``, runs the scenarios."""
    global T0
    T0 = time.monotonic()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # (the test process's sys.stdout/stderr may be pytest's)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    run_rank(spec, models)


def main():
    run_rank(json.loads(Path(sys.argv[1]).read_text()))


def run_rank(spec: dict, models=None):
    rank = int(os.environ["RANK"])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["timeout"]))
    _audit(spec["watch"])

    from dreamcache.apps.train import cli as train_cli
    from dreamcache.apps.train import loop as trainer
    from dreamcache.comfy import loading

    models = [models] if models is not None else []

    def tiny_checkpoint(path, dtype=None):
        if not models:
            from tiny_models import make_clip, make_model, make_vae

            models.append((make_model("sd1"), make_clip("sd1"), make_vae()))
        return models[0]

    loading.load_checkpoint = tiny_checkpoint
    real_loss = trainer.Trainer.loss
    results = []
    result_path = Path(f"{spec['result']}.rank{rank}.json")
    for sc in spec["scenarios"]:
        trainer.Trainer.loss = real_loss
        if sc.get("oom_rank") == rank:

            def oom(self, prep):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            trainer.Trainer.loss = oom
        if sc.get("crash_rank") == rank:

            def crash(self, prep):
                sys.stderr.flush()
                os._exit(3)

            trainer.Trainer.loss = crash
        if sc.get("wait_for"):  # a file the test writes meanwhile (in parallel with the first scenarios)
            t0 = time.monotonic()
            while not Path(sc["wait_for"]).exists():
                if time.monotonic() - t0 > spec["timeout"]:
                    raise SystemExit(f"{sc['wait_for']} did not appear")
                time.sleep(0.2)
        print(f"=== scenario {sc['name']} (at {time.monotonic() - T0:.1f} s)", file=sys.stderr, flush=True)
        rc = train_cli.main(sc["argv"] + sc.get(f"extra_rank{rank}", []))
        results.append({"name": sc["name"], "rc": rc})
        result_path.write_text(json.dumps({"results": results, "writes": WRITES}))
    print(f"=== end (at {time.monotonic() - T0:.1f} s)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(results[-1]["rc"] if results else 1)  # no destroy_process_group: the last scenario may have lost its peer


if __name__ == "__main__":
    main()
