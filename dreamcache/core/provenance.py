"""What a trained adapter says about itself, for sharing: written by the trainer into the adapter file's safetensors
metadata (beside the format's own keys, docs/method.md's file format is unchanged), read back by
``python -m dreamcache info`` and turned into a model card (Markdown with Hugging Face front matter) by
``python -m dreamcache card``.

Metadata keys (JSON values): ``base_checkpoint_hash`` (SHA-256 of the checkpoint's U-Net, text encoder and VAE
weights: :func:`dreamcache.comfy.frozen.checkpoint_fingerprint`), ``dataset`` (``items``, ``objects``, ``hash``:
names and sizes of the dataset's files), ``steps``, ``global_batch``, ``resolution``, ``init_origin`` (the
``--init-from`` adapter: file, family, step; absent for a run from scratch), ``evaluation`` (the latest
``--eval-every`` scores and their step), ``precomputed`` (trained from a precomputed set). The format's own
``base_family`` and ``base_checkpoint`` (file name) complete them.
"""
from __future__ import annotations

import json

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def training_metadata(*, checkpoint_hash: str, dataset_items: int, dataset_objects: int, dataset_hash: str,
                      steps: int, global_batch: int, resolution: int, init_origin: dict | None,
                      evaluation: dict | None, precomputed: bool = False) -> dict:
    """The provenance keys the trainer writes (values JSON-able; ``save_adapter`` stores non-strings as JSON)."""
    meta = {"base_checkpoint_hash": checkpoint_hash,
            "dataset": {"items": int(dataset_items), "objects": int(dataset_objects), "hash": dataset_hash},
            "steps": int(steps), "global_batch": int(global_batch), "resolution": int(resolution),
            "precomputed": bool(precomputed)}
    if init_origin:
        meta["init_origin"] = init_origin
    if evaluation:
        meta["evaluation"] = evaluation
    return meta


def _json(value, default=None):
    if value is None:
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def adapter_summary(metadata: dict, family: str | None = None) -> dict:
    """The provenance of an adapter file's metadata as one dict (None where the file does not say: e.g. the
    released reference adapter, or one converted from a ``.pt``)."""
    m = metadata or {}
    return {
        "base_family": family or m.get("base_family") or None,
        "base_checkpoint": m.get("base_checkpoint") or None,
        "base_checkpoint_hash": m.get("base_checkpoint_hash") or None,
        "dataset": _json(m.get("dataset")),
        "steps": _json(m.get("steps"), _json(m.get("step"))),
        "global_batch": _json(m.get("global_batch")),
        "resolution": _json(m.get("resolution")),
        "init_origin": _json(m.get("init_origin")),
        "evaluation": _json(m.get("evaluation")),
        "precomputed": _json(m.get("precomputed")),
        "objective": m.get("objective") or None,
        "trained_by": m.get("trained_by") or m.get("written_by") or None,
    }


def model_card(name: str, summary: dict, layers: list[str], parameters: int, *, base_model: str | None = None,
               license: str = "other") -> str:
    """A model card (Markdown, Hugging Face front matter) for the adapter ``name`` from :func:`adapter_summary`."""
    s = summary
    fam = FAMILY_LABELS.get(s.get("base_family") or "", "an unrecorded family")
    front = ["---", f"license: {license}", "library_name: comfyui-dreamcache", "pipeline_tag: text-to-image", "tags:",
             "- dreamcache", "- comfyui", "- stable-diffusion", "- subject-driven-generation"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    unknown = "not recorded"
    ds = s.get("dataset") or {}
    origin = s.get("init_origin")
    lines = [
        f"# {name}", "",
        f"DreamCache adapter ({parameters:,} parameters, {len(layers)} layers: {', '.join(layers)}) for {fam} "
        "checkpoints, for [ComfyUI-DreamCache](https://github.com/comfyui-dreamcache/ComfyUI-DreamCache) "
        "(DreamCache, CVPR 2025: personalised generation from one reference photo, no finetuning at use).", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| base model | {s.get('base_checkpoint') or unknown} ({fam}) |",
        f"| base weights SHA-256 (U-Net + text encoder + VAE) | `{s.get('base_checkpoint_hash') or unknown}` |",
        f"| dataset | {ds.get('items', unknown)} items, {ds.get('objects', unknown)} objects, hash "
        f"`{ds.get('hash', unknown)}` |",
        f"| steps | {s.get('steps') if s.get('steps') is not None else unknown} |",
        f"| global batch | {s.get('global_batch') or unknown} |",
        f"| resolution | {str(s.get('resolution')) + ' px' if s.get('resolution') else unknown} |",
        f"| objective | {s.get('objective') or unknown} |",
        "| started from | " + (f"`{origin.get('file')}` ({FAMILY_LABELS.get(origin.get('family'), 'unrecorded family')}"
                                 f"{', step ' + str(origin['step']) if origin.get('step') else ''})"
                                 if origin else "scratch (identity / default init)") + " |",
        f"| precomputed training set | {'yes' if s.get('precomputed') else 'no'} |",
        "",
    ]
    ev = s.get("evaluation")
    lines += ["## Evaluation", ""]
    if ev:
        scores = ", ".join(f"{label} {ev[k]:.4f}" for k, label in METRIC_LABELS.items()
                           if isinstance(ev.get(k), (int, float)))
        lines += [f"At step {ev.get('step', unknown)}, on the DreamBench subset of `--eval-every` "
                  f"({ev.get('images', '?')} images): {scores or 'no scores'}. A subset, not the full protocol of "
                  "`python -m dreamcache.eval`.", ""]
    else:
        lines += ["Not evaluated during training; score it with `python -m dreamcache.eval` (DreamBench).", ""]
    lines += ["## Use", "",
              "Put the file in `ComfyUI/models/dreamcache/`, load it with **DreamCache Loader** and apply it to a "
              f"{fam} checkpoint with **Apply DreamCache** (see the pack's README).", ""]
    return "\n".join(front + [""] + lines)
