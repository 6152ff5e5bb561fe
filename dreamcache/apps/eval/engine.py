"""The evaluation run: which images are missing, generating them, scoring them, and writing the results.

Output folder layout::

    run.json                               settings of the run (a resumed or sharded run must match them)
    images/<method>/<subject>/pNN_K.png    generated images (prompt NN, image K)
    references/<subject>.png, _mask.png    the reference as BuildFeatureCache saw it, and the subject mask
    scores/<shard>.csv                     one row per image: subject, prompt, seed, file, each metric
    scores/<shard>.runs.json               wall time and counts of each run of that shard
    results.md, results.json               per-subject and overall tables beside the paper's Table 2
    grids/<method>/<subject>.jpg           reference | generations, one row per prompt, the prompt under it

Resumable: an image whose file exists is not generated again, a scored image is not scored again (unless it was
generated again in this run). Shards (``--shard I/N``) take disjoint sets of prompt groups; ``--merge`` (or an
unsharded run) writes the tables and grids from every shard's scores.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ...core.errors import DreamCacheError
from ...core.image import to_uint8
from . import report
from .generate import BASELINE, Method, Reference, load_reference, save_png
from .protocol import Item, Protocol, load_protocol, shard_items, shard_name

RUN_FILE = "run.json"
SCORE_CHUNK = 64
#: run.json entries that decide what an image looks like: a resumed or sharded run must agree on them
IDENTITY = ("checkpoint", "sampling", "resolution", "mask_mode", "seed", "reference", "adapters")


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not enabled or total == 0)


class Evaluation:
    """One evaluation run over ``protocol`` x ``methods`` (this shard's part of it).

    ``generator``: a :class:`dreamcache.apps.eval.generate.Generator` (None: generate nothing, only score what
    exists). ``scorers``: :class:`dreamcache.apps.eval.metrics.Scorers` (None: no scoring). ``segmenter``: SAM for
    references in ``sam`` mask mode and for the masked metrics on generated images."""

    def __init__(
        self,
        out,
        protocol: Protocol,
        methods: list[Method],
        generator=None,
        scorers=None,
        segmenter=None,
        shard: tuple[int, int] = (1, 1),
        mask_mode: str = "none",
        masks_dir=None,
        batch_size: int = 1,
        progress: bool = True,
        grid_size: int = 128,
        grids: bool = True,
        checkpoint: str = "",
        log=logging.info,
    ):
        self.out = Path(out)
        self.protocol = protocol
        self.methods = methods
        self.generator, self.scorers, self.segmenter = generator, scorers, segmenter
        self.shard = shard
        self.mask_mode = mask_mode
        self.masks_dir = Path(masks_dir) if masks_dir else None
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.grid_size, self.grids = grid_size, grids
        self.checkpoint = checkpoint
        self.log = log
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise DreamCacheError(
                f"Two methods share a name ({', '.join(names)}); give the adapter files different names."
            )
        self.items = shard_items(protocol.items(names), shard)
        self._refs: dict[str, Reference] = {}
        self.timing = {"generation_seconds": 0.0, "generated": 0, "scoring_seconds": 0.0, "scored": 0}

    # ---- settings ---------------------------------------------------------------------------------------------------
    def run_settings(self) -> dict:
        g = self.generator
        return {
            "checkpoint": self.checkpoint,
            "sampling": g.settings.to_json() if g is not None else None,
            "resolution": g.size if g is not None else None,
            "mask_mode": self.mask_mode,
            "seed": self.protocol.seed,
            "reference": self.protocol.reference,
            "adapters": {m.name: Path(m.path).name for m in self.methods if m.adapter is not None},
        }

    def check_run_file(self) -> dict:
        """Write ``run.json``, or check this run against it (same images for the same settings)."""
        path = self.out / RUN_FILE
        mine = self.run_settings()
        selection = {
            "dreambench": str(self.protocol.root),
            "subjects": [s.name for s in self.protocol.subjects],
            "prompt_indices": self.protocol.prompt_indices,
            "images_per_prompt": self.protocol.images_per_prompt,
            "seed": self.protocol.seed,
            "reference": self.protocol.reference,
        }
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            clashes = []
            for k in IDENTITY:
                a, b = mine.get(k), old.get(k)
                if a is None or b is None:
                    continue
                if k == "adapters":
                    both = set(a) & set(b)
                    diff = [n for n in both if a[n] != b[n]]
                    if diff:
                        clashes.append(f"adapter '{diff[0]}' is {a[diff[0]]} here but {b[diff[0]]} there")
                    mine[k] = {**b, **a}
                elif a != b:
                    clashes.append(f"{k} {a!r} (the folder has {b!r})")
            if clashes:
                raise DreamCacheError(
                    f"'{self.out}' holds images made with other settings: "
                    + "; ".join(clashes)
                    + "; use another --out folder, or the same settings to resume."
                )
            for k in IDENTITY:
                if mine.get(k) is None:
                    mine[k] = old.get(k)
            mine["methods"] = list(OrderedDict.fromkeys(old.get("methods", []) + [m.name for m in self.methods]))
        else:
            mine["methods"] = [m.name for m in self.methods]
        mine["selection"] = selection
        report.write_json(path, mine)
        return mine

    # ---- references -------------------------------------------------------------------------------------------------
    def reference(self, subject: str) -> Reference:
        if subject not in self._refs:
            s = self.protocol.subject(subject)
            size = self.generator.size if self.generator is not None else 512
            layout = self.generator.settings.layout if self.generator is not None else "train"
            threshold = self.generator.settings.threshold if self.generator is not None else 0.5
            ref = load_reference(
                self.protocol.reference_image(s),
                subject,
                self.mask_mode,
                size,
                layout,
                self.masks_dir,
                self.segmenter,
                threshold,
            )
            save_png(to_uint8(ref.image[0]), self.out / "references" / f"{subject}.png")
            if ref.mask is not None:
                save_png((ref.mask * 255).astype(np.uint8), self.out / "references" / f"{subject}_mask.png")
            self._refs[subject] = ref
        return self._refs[subject]

    # ---- generation -------------------------------------------------------------------------------------------------
    def missing(self) -> list[Item]:
        return [it for it in self.items if not (self.out / it.file).is_file()]

    def generate(self) -> list[Item]:
        """Generate every missing image of this shard; returns the items generated."""
        todo = self.missing()
        if not todo:
            return []
        if self.generator is None:
            raise DreamCacheError(
                f"{len(todo)} images are missing in '{self.out}' and this run cannot generate; pass --checkpoint."
            )
        by_method = {m.name: m for m in self.methods}
        groups: "OrderedDict[tuple, list[Item]]" = OrderedDict()
        for it in todo:
            groups.setdefault((it.method, it.subject), []).append(it)
        done = []
        t0 = time.perf_counter()
        bar = _progress(len(todo), "generating", self.progress)
        try:
            for (mname, subject), items in groups.items():
                method = by_method[mname]
                bar.set_postfix_str(f"{mname} / {subject}")
                ref = self.reference(subject) if method.adapter is not None else None
                model, _ = self.generator.model_for(method, ref)
                prompts: "OrderedDict[int, list[Item]]" = OrderedDict()
                for it in items:
                    prompts.setdefault(it.prompt_index, []).append(it)
                for batch_items in prompts.values():
                    for i in range(0, len(batch_items), self.batch_size):
                        chunk = batch_items[i : i + self.batch_size]
                        images = self.generator.sample(model, method, chunk[0].prompt, [it.seed for it in chunk])
                        for it, rgb in zip(chunk, images):
                            save_png(rgb, self.out / it.file)
                            done.append(it)
                        bar.update(len(chunk))
        finally:
            bar.close()
            self.timing["generation_seconds"] += time.perf_counter() - t0
            self.timing["generated"] += len(done)
        return done

    # ---- scoring ----------------------------------------------------------------------------------------------------
    def scores_path(self) -> Path:
        return self.out / report.SCORES_DIR / f"{shard_name(self.shard)}.csv"

    def score(self, regenerated: list[Item] = ()) -> list[dict]:
        """Score this shard's images that have no score yet (in any shard's file); writes this shard's CSV."""
        stale = {it.key for it in regenerated}
        existing = {k: r for k, r in report.all_scores(self.out).items() if k not in stale}
        rows = {}
        pending = []
        for it in self.items:
            r = existing.get(it.key)
            if r is not None and r.get("dino") is not None and (self.out / it.file).is_file():
                rows[it.key] = r
            elif (self.out / it.file).is_file():
                pending.append(it)
        if pending and self.scorers is None:
            self.log(f"{len(pending)} images are not scored (no metric models in this run).")
            pending = []
        t0 = time.perf_counter()
        bar = _progress(len(pending), "scoring", self.progress)
        try:
            for i in range(0, len(pending), SCORE_CHUNK):
                chunk = pending[i : i + SCORE_CHUNK]
                for r in self.score_items(chunk):
                    rows[row_key_of(r)] = r
                report.write_scores(self.scores_path(), list(rows.values()))
                bar.update(len(chunk))
                self.timing["scored"] += len(chunk)
        finally:
            bar.close()
            self.timing["scoring_seconds"] += time.perf_counter() - t0
        if rows or not self.scores_path().exists():
            report.write_scores(self.scores_path(), list(rows.values()))
        return list(rows.values())

    def score_items(self, items: list[Item]) -> list[dict]:
        from .metrics import score_images

        generated = [_load_png(self.out / it.file) for it in items]
        subjects = sorted({it.subject for it in items})
        refs = {s: self.reference(s) for s in subjects}
        gen_masks = None
        if self.segmenter is not None:
            gen_masks = [self.segmenter.mask(g) for g in generated]
        ref_masks = {s: r.mask for s, r in refs.items() if r.mask is not None}
        metrics = score_images(
            self.scorers,
            generated,
            [it.prompt for it in items],
            [it.subject for it in items],
            {s: r.photo for s, r in refs.items()},
            gen_masks,
            ref_masks,
        )
        out = []
        for it, m in zip(items, metrics):
            out.append(
                {
                    "method": it.method,
                    "subject": it.subject,
                    "kind": self.protocol.subject(it.subject).kind,
                    "prompt_index": it.prompt_index,
                    "prompt": it.prompt,
                    "image_index": it.image_index,
                    "seed": it.seed,
                    "file": it.file,
                    **m,
                }
            )
        return out

    # ---- the whole run ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Generate what is missing, score what is unscored, and (unsharded) write tables and grids."""
        start = time.perf_counter()
        self.check_run_file()
        self.log(
            f"{len(self.items)} images in {'this shard' if self.shard[1] > 1 else 'the protocol'}, "
            f"{len(self.missing())} to generate, in '{self.out}'."
        )
        generated = self.generate()
        rows = self.score(generated)
        wall = time.perf_counter() - start
        self.record_run(wall)
        result = {"generated": len(generated), "scored": self.timing["scored"], "rows": len(rows), "wall_seconds": wall}
        if self.shard[1] == 1:
            result["report"] = write_report(self.out, self.protocol, grids=self.grids, grid_size=self.grid_size)
        return result

    def record_run(self, wall: float):
        path = self.scores_path().with_suffix(".runs.json")
        runs = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        runs.append(
            {
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "wall_seconds": round(wall, 3),
                "device": device_name(),
                "host": platform.node(),
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.timing.items()},
            }
        )
        report.write_json(path, runs)


def row_key_of(r: dict):
    return report.row_key(r)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _wall_time(out: Path) -> dict | None:
    runs = []
    for f in sorted((out / report.SCORES_DIR).glob("*.runs.json")):
        runs += json.loads(f.read_text(encoding="utf-8"))
    if not runs:
        return None
    seconds = sum(r["wall_seconds"] for r in runs)
    gen = sum(r.get("generated", 0) for r in runs)
    gen_s = sum(r.get("generation_seconds", 0.0) for r in runs)
    return {
        "runs": len(runs),
        "seconds": seconds,
        "generated": gen,
        "generation_seconds": gen_s,
        "seconds_per_generated_image": gen_s / gen if gen else None,
        "scoring_seconds": sum(r.get("scoring_seconds", 0.0) for r in runs),
        "devices": sorted({r.get("device", "") for r in runs}),
    }


def write_report(
    out, protocol: Protocol | None = None, dreambench=None, grids: bool = True, grid_size: int = 128
) -> dict:
    """Tables (``results.md``, ``results.json``) and grids from every shard's scores in ``out``. Without
    ``protocol``, the run's selection in ``run.json`` is used (on ``dreambench`` if given, else the folder it names)."""
    out = Path(out)
    run_path = out / RUN_FILE
    if not run_path.is_file():
        raise DreamCacheError(
            f"'{out}' holds no evaluation run ({RUN_FILE} is missing); pass the --out folder of the run."
        )
    run = json.loads(run_path.read_text(encoding="utf-8"))
    sel = run["selection"]
    if protocol is None:
        protocol = load_protocol(
            dreambench or sel["dreambench"],
            sel["subjects"],
            sel["prompt_indices"],
            sel["images_per_prompt"],
            sel["seed"],
            sel["reference"],
        )
    methods = run["methods"]
    expected = protocol.items(methods)
    rows_by_key = report.all_scores(out)
    keys = {it.key for it in expected}
    rows = [r for k, r in rows_by_key.items() if k in keys]
    subjects = [s.name for s in protocol.subjects]
    data = {
        "protocol": {
            "dreambench": str(protocol.root),
            "subjects": len(subjects),
            "prompts_per_subject": len(protocol.prompts(protocol.subjects[0])),
            "images_per_prompt": protocol.images_per_prompt,
            "seed": protocol.seed,
            "reference": protocol.reference,
            "subject_names": subjects,
        },
        "settings": {k: run.get(k) for k in IDENTITY},
        "completeness": {
            "expected": len(expected),
            "found": len(rows),
            "missing_examples": [it.file for it in expected if it.key not in rows_by_key][:5],
        },
        "wall_time": _wall_time(out),
        "methods": report.tables(rows, methods, subjects),
        "paper_table2": report.PAPER_TABLE2,
    }
    report.write_json(out / "results.json", data)
    (out / "results.md").write_text(report.markdown(data), encoding="utf-8")
    if grids:
        for m in methods:
            for s in protocol.subjects:
                ref = out / "references" / f"{s.name}.png"
                reference = ref if ref.is_file() else protocol.reference_image(s)
                grid_rows = []
                for pi, prompt in protocol.prompts(s):
                    files = [out / f"images/{m}/{s.name}/p{pi:02d}_{k}.png" for k in range(protocol.images_per_prompt)]
                    grid_rows.append((prompt, [f if f.is_file() else None for f in files]))
                report.grid(reference, grid_rows, grid_size, out / "grids" / m / f"{s.name}.jpg")
    return data


def method_names(adapter_paths: list[str], baseline: bool) -> list[str]:
    """Row names: ``baseline`` for no adapter, the adapter file's stem otherwise (numbered when two clash)."""
    names = [BASELINE] if baseline else []
    for p in adapter_paths:
        stem = Path(p).stem
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names
