"""``python -m dreamcache.train``: train (or fine-tune) DreamCache adapters on a frozen SD1.x / SD2.x / SDXL model.

This module holds what needs no ComfyUI: the run configuration, checkpoint naming, the resumable training state
(safetensors + JSON, nothing pickled) and the command line's parser. The training engine is
:mod:`dreamcache.apps.train.loop` (ComfyUI loads the model; the U-Net runs through ComfyUI's own modules) and
:mod:`dreamcache.apps.train.cli` runs the command.

Checkpoints: ``<out>-step000500.safetensors`` (the pack's adapter format; metadata: base family, layers, step,
config) beside ``<out>-step000500.state.safetensors`` (optimizer moments and step counts as tensors, RNG states as
uint8 tensors, everything else JSON in the header). The final adapter is ``<out>`` with
``<out stem>.state.safetensors``,
so a finished run can be extended with ``--resume`` and a larger ``--steps``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ... import __version__
from ...core.errors import DreamCacheError
from ...core.files import read_safetensors
from ...core.layers import LayerRef, parse_layer
from .batch import resolve_batch

STATE_FORMAT = "dreamcache.train_state"
STATE_FORMAT_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INITS = ("identity", "reference")
#: Default of ``--dist-timeout``: how long a rank waits in a collective (and at the rendezvous) for the others.
#: Longer than any legitimate imbalance (rank 0 writing a checkpoint or rendering a preview, the first batches of
#: a cold file cache), a small fraction of a multi-day run.
DEFAULT_TIMEOUT_S = 600
BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the authors' trainer's where it has one
    (AdamW lr 1e-5, weight decay 0.01, caption dropout 0.07, timesteps uniform in 0..999)."""

    data: str = ""
    out: str = "dreamcache_adapter.safetensors"
    checkpoint: str = ""  # the base checkpoint (recorded in the metadata; the CLI loads it)
    steps: int = 1000
    batch_size: int = 1
    accumulate: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 0.0  # 0 = no clipping (the reference does not clip)
    precision: str = "auto"  # auto: bf16 on a CUDA GPU that has it, fp16 on older GPUs, fp32 on the CPU
    gradient_checkpointing: bool = False
    seed: int = 0
    resolution: int = 0  # 0 = the family's native size (512 for SD1/SD2, 1024 for SDXL)
    layers: list[str] | None = None  # None = the family's default set (dreamcache.layers.default_layers)
    # identity: linear_cat = [I | 0], step 0 is exactly the base model; reference: PyTorch default init
    init: str = "identity"
    init_from: str | None = None  # an adapter file (.pt or .safetensors) to fine-tune
    caption_dropout: float = 0.07
    augment: bool = True  # False (--no-augment): one fixed, un-augmented reference per item (and its noise)
    precomputed: str | None = None  # a set made by python -m dreamcache.data precompute (the frozen parts stored)
    save_every: int = 1000
    preview_every: int = 0
    preview_prompt: str | None = None
    preview_reference: str | None = None
    preview_mask: str | None = None
    preview_steps: int = 20
    preview_text_scale: float = 7.5
    preview_image_scale: float = 5.0
    eval_every: int = 0  # score the adapter on a small DreamBench subset every N steps (dreamcache.apps.eval)
    eval_dreambench: str | None = None
    eval_subjects: list[str] | None = None
    eval_prompts: int = 2
    eval_steps: int = 20
    eval_dino: str | None = None
    eval_clip: str | None = None
    eval_masks: str | None = None
    num_workers: int = 2
    validate_files: bool = True
    progress: bool = True

    #: fields that define the optimisation; a resumed run must keep them (else it would not continue the same run)
    IDENTITY = ("data", "batch_size", "accumulate", "lr", "weight_decay", "betas", "adam_eps", "max_grad_norm",
                "precision",
                "seed", "resolution", "layers", "init", "init_from", "caption_dropout", "augment", "precomputed")

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        problems = []
        if self.steps < 0:
            problems.append(f"--steps {self.steps} is negative")
        if self.batch_size < 1 or self.accumulate < 1:
            problems.append(f"--batch-size {self.batch_size} and --accumulate {self.accumulate} must be at least 1")
        if not self.lr > 0:
            problems.append(f"--lr {self.lr} must be positive")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("--weight-decay and --max-grad-norm must not be negative")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision} is not one of {', '.join(PRECISIONS)}")
        if self.init not in INITS:
            problems.append(f"--init {self.init} is not one of {', '.join(INITS)}")
        if not 0 <= self.caption_dropout <= 1:
            problems.append(f"--caption-dropout {self.caption_dropout} is not a probability")
        if self.resolution and (self.resolution < 64 or self.resolution % 64):
            problems.append(f"--resolution {self.resolution} must be a multiple of 64")
        if self.save_every < 0 or self.preview_every < 0:
            problems.append("--save-every and --preview-every must not be negative")
        if self.eval_every < 0 or self.eval_prompts < 1 or self.eval_steps < 1:
            problems.append("--eval-every must not be negative, --eval-prompts and --eval-steps must be at least 1")
        if problems:
            raise DreamCacheError("Bad training settings: " + "; ".join(problems) + ".")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "betas" else v) for k, v in d.items() if k in known})

    def layer_refs(self) -> list[LayerRef] | None:
        return None if self.layers is None else [parse_layer(s) for s in self.layers]


def layer_names(refs) -> list[str]:
    return [r.module if r.block_index == 0 else f"{r.module}[{r.block_index}]" for r in refs]


# ---- file names ------------------------------------------------------------------------------------------------------

def output_stem(out: str) -> str:
    """``out`` (the adapter file) without its .safetensors/.sft suffix: every file of the run is named after it."""
    p = str(out)
    for ext in (".safetensors", ".sft"):
        if p.lower().endswith(ext):
            return p[: -len(ext)]
    return p


def checkpoint_path(out: str, step: int | None) -> str:
    """The adapter file of ``step`` (None: the final ``out`` itself)."""
    return str(out) if step is None else f"{output_stem(out)}-step{step:06d}.safetensors"


def state_path_for(adapter_path: str) -> str:
    return f"{output_stem(adapter_path)}.state.safetensors"


def log_path(out: str) -> str:
    return f"{output_stem(out)}.loss.csv"


def preview_path(out: str, step: int) -> str:
    return f"{output_stem(out)}-preview-step{step:06d}.png"


def find_latest_state(out: str) -> str | None:
    """The state file with the highest step among ``<out>-stepN.state.safetensors`` and
    ``<out stem>.state.safetensors``."""
    best, best_step = None, -1
    stem = Path(output_stem(out))
    folder = stem.parent if str(stem.parent) else Path(".")
    if not folder.is_dir():
        return None
    pat = re.compile(re.escape(stem.name) + r"(?:-step(\d+))?\.state\.safetensors$")
    for f in folder.iterdir():
        if pat.fullmatch(f.name):
            try:
                step = read_state_header(str(f))[0]
            except DreamCacheError:
                continue
            if step > best_step:
                best, best_step = str(f), step
    return best


# ---- training state (resume) -----------------------------------------------------------------------------------------

@dataclass
class TrainState:
    step: int
    config: TrainConfig
    adapter_file: str  # path of the adapter checkpoint that goes with this state
    param_names: list[str]
    optimizer: dict  # torch optimizer state_dict (tensors inside)
    scaler: dict | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _json_safe(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return v


def save_state(path: str, state: TrainState):
    """Write a training state: optimizer tensors + RNG states in safetensors, the rest JSON in its header."""
    from ...core.adapter_io import atomic_save_safetensors

    tensors: dict[str, torch.Tensor] = {}
    opt = state.optimizer
    for idx, st in opt["state"].items():
        name = state.param_names[int(idx)]
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(v)
            tensors[f"optimizer.{name}.{k}"] = v.detach().cpu().contiguous()
    for k, v in state.rng.items():
        tensors[f"rng.{k}"] = v.detach().cpu().contiguous()
    groups = [{k: _json_safe(v) for k, v in g.items()} for g in opt["param_groups"]]
    meta = {
        "format": STATE_FORMAT,
        "format_version": str(STATE_FORMAT_VERSION),
        "step": str(state.step),
        "config": json.dumps(state.config.to_json()),
        "adapter_file": os.path.basename(state.adapter_file),
        "param_names": json.dumps(state.param_names),
        "param_groups": json.dumps(groups),
        "scaler": json.dumps(_json_safe(state.scaler)),
        "extra": json.dumps(_json_safe(state.extra)),
        "written_by": f"ComfyUI-DreamCache {__version__}",
    }
    if not tensors:  # safetensors needs at least one tensor for a readable header on every version
        tensors["rng.none"] = torch.zeros(1, dtype=torch.uint8)
    atomic_save_safetensors(tensors, path, meta)


def read_state_header(path: str) -> tuple[int, dict]:
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DreamCacheError(f"Training state '{path}' does not exist; pass a '<name>-stepN.safetensors' checkpoint "
                              "whose .state.safetensors sits beside it.")
    _, meta = read_safetensors(path, name, "the training state is damaged", tensors=False)
    if meta.get("format") != STATE_FORMAT:
        raise DreamCacheError(f"'{name}' is not a DreamCache training state (format {meta.get('format')!r}); pass the "
                              ".state.safetensors written by the trainer.")
    if int(meta.get("format_version", "0")) > STATE_FORMAT_VERSION:
        raise DreamCacheError(f"'{name}' was written by a newer trainer; update ComfyUI-DreamCache to resume it.")
    return int(meta["step"]), meta


def load_state(path: str) -> TrainState:
    """Read a training state (safetensors + JSON only; nothing is unpickled)."""
    step, meta = read_state_header(path)
    name = os.path.basename(path)
    tensors, _ = read_safetensors(path, name, "the training state is damaged")
    try:
        config = TrainConfig.from_json(json.loads(meta["config"]))
        param_names = json.loads(meta["param_names"])
        groups = json.loads(meta["param_groups"])
        scaler = json.loads(meta.get("scaler", "null"))
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise DreamCacheError(f"'{name}' has unreadable training-state metadata ({type(e).__name__}: {e}); the file is "
                              "damaged.") from None
    index = {n: i for i, n in enumerate(param_names)}
    opt_state: dict[int, dict] = {}
    rng = {}
    for k, v in tensors.items():
        if k.startswith("rng."):
            if k != "rng.none":
                rng[k[4:]] = v
            continue
        if not k.startswith("optimizer."):
            raise DreamCacheError(f"'{name}' holds an unexpected tensor '{k}'; the training state is damaged.")
        pname, _, key = k[len("optimizer."):].rpartition(".")
        if pname not in index:
            raise DreamCacheError(f"'{name}' has optimizer state for an unknown parameter '{pname}'; the training "
                                  "state is damaged.")
        opt_state.setdefault(index[pname], {})[key] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    adapter_file = os.path.join(os.path.dirname(os.path.abspath(path)), meta.get("adapter_file", ""))
    return TrainState(step=step, config=config, adapter_file=adapter_file, param_names=param_names,
                      optimizer={"state": opt_state, "param_groups": groups}, scaler=scaler, rng=rng, extra=extra)


def resolve_resume(resume: str, out: str | None) -> str:
    """``--resume`` accepts a state file, an adapter checkpoint (its state sits beside it) or ``latest``."""
    if resume == "latest":
        found = find_latest_state(out or "")
        if found is None:
            raise DreamCacheError(f"--resume latest found no training state next to '{out}'; pass a checkpoint file "
                                  "instead.")
        return found
    if resume.endswith(".state.safetensors"):
        return resume
    return state_path_for(resume)


# ---- command line ----------------------------------------------------------------------------------------------------

_ARG_FIELDS = {}


def _arg(group, flag, field_name, **kw):
    _ARG_FIELDS[field_name] = flag
    group.add_argument(flag, dest=field_name, default=argparse.SUPPRESS, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dreamcache.train",
        description="Train DreamCache adapters on a frozen SD1.x / SD2.x / SDXL checkpoint (only the adapters learn).")
    g = p.add_argument_group("what to train")
    _arg(g, "--checkpoint", "checkpoint", help="base checkpoint (.safetensors / .ckpt), loaded with ComfyUI's loader")
    _arg(g, "--data", "data", help="dataset root: <object_id>/<n>_generation.png, <n>_caption.txt, <n>_mask.png")
    _arg(g, "--out", "out", help="final adapter file (.safetensors); checkpoints, log and previews go beside it")
    _arg(g, "--layers", "layers", type=lambda s: [x for x in re.split(r"[,\s]+", s) if x],
         help="comma-separated SpatialTransformer paths (default: the family's set; SDXL: middle_block.1, "
              "output_blocks.1.1, 3.1, 5.1)")
    _arg(g, "--init", "init", choices=INITS, help="identity (default: step 0 equals the base model) or reference "
                                                  "(PyTorch default init)")
    _arg(g, "--init-from", "init_from", help="an existing adapter (.pt or .safetensors) to fine-tune, e.g. the "
                                             "released cross_attention-199999.pt")
    _arg(g, "--precomputed", "precomputed",
         help="read the frozen parts (latents, text encodings, reference caches) from this set, made by python -m "
              "dreamcache.data precompute for this checkpoint, dataset and resolution")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=argparse.SUPPRESS,
                   help="no reference augmentation: each item's reference is its subject centred at 85%% width, with "
                        "one fixed cache-pass noise (what a precomputed set made with --no-augment stores)")
    g = p.add_argument_group("optimisation")
    _arg(g, "--steps", "steps", type=int, help="total optimizer steps (default 1000; resuming continues up to this)")
    _arg(g, "--batch-size", "batch_size", type=int, help="images per micro-batch (on each rank; default 1)")
    _arg(g, "--accumulate", "accumulate", type=int, help="micro-batches per optimizer step (default 1)")
    _arg(g, "--lr", "lr", type=float, help="AdamW learning rate (default 1e-5, the reference's)")
    _arg(g, "--weight-decay", "weight_decay", type=float, help="AdamW weight decay (default 0.01)")
    _arg(g, "--max-grad-norm", "max_grad_norm", type=float, help="clip the gradient norm (default 0: off)")
    _arg(g, "--precision", "precision", choices=PRECISIONS, help="auto (bf16/fp16 autocast on CUDA, fp32 on CPU), "
                                                                 "fp32, bf16 or fp16")
    _arg(g, "--gradient-checkpointing", "gradient_checkpointing", action="store_true",
         help="recompute the frozen U-Net's blocks in the backward pass (less activation memory, slower)")
    _arg(g, "--seed", "seed", type=int, help="seed of everything random (default 0)")
    _arg(g, "--resolution", "resolution", type=int, help="training size (default: 512 for SD1/SD2, 1024 for SDXL)")
    _arg(g, "--caption-dropout", "caption_dropout", type=float, help="probability of training on the empty caption "
                                                                     "(default 0.07)")
    g = p.add_argument_group("checkpoints, logs, previews")
    _arg(g, "--save-every", "save_every", type=int, help="write a checkpoint every N steps (default 1000; 0 = only at "
                                                         "the end)")
    _arg(g, "--preview-every", "preview_every", type=int, help="render a preview image every N steps (default 0 = "
                                                               "never)")
    _arg(g, "--preview-prompt", "preview_prompt", help="preview prompt (default: the first dataset item's caption)")
    _arg(g, "--preview-reference", "preview_reference", help="preview subject image (default: the first dataset item)")
    _arg(g, "--preview-mask", "preview_mask", help="mask of --preview-reference (white = subject; default: its alpha, "
                                                   "or none)")
    _arg(g, "--preview-steps", "preview_steps", type=int, help="sampling steps of a preview (default 20)")
    _arg(g, "--num-workers", "num_workers", type=int, help="data loading processes (default 2)")
    g.add_argument("--no-validate", dest="validate_files", action="store_false", default=argparse.SUPPRESS,
                   help="only check that every item has its files (skip opening every image before training)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    g = p.add_argument_group("evaluation during training (DreamBench subset, see docs/evaluation.md)")
    _arg(g, "--eval-every", "eval_every", type=int,
         help="score the adapter every N steps: DINO / CLIP-I / CLIP-T into <out>.eval.csv (default 0 = never)")
    _arg(g, "--eval-dreambench", "eval_dreambench", help="DreamBench folder (default $DREAMBENCH_PATH)")
    _arg(g, "--eval-subjects", "eval_subjects", type=lambda s: [x for x in re.split(r"[,\s]+", s) if x],
         help="comma-separated subjects (default: the first object and the first live subject)")
    _arg(g, "--eval-prompts", "eval_prompts", type=int, help="prompts per subject, one image each (default 2)")
    _arg(g, "--eval-steps", "eval_steps", type=int, help="sampling steps of an evaluation image (default 20)")
    _arg(g, "--eval-dino", "eval_dino", help="folder of facebook/dino-vits16 (default: the Hugging Face cache)")
    _arg(g, "--eval-clip", "eval_clip", help="folder of openai/clip-vit-base-patch32 (default: the Hugging Face cache)")
    _arg(g, "--eval-masks", "eval_masks", help="reference masks <subject>/<NN>_mask.png (default: the whole photo)")
    p.add_argument("--resume", help="continue a run bit-identically: a checkpoint, its .state.safetensors, or 'latest' "
                                    "(next to --out)")
    p.add_argument("--estimate", action="store_true",
                   help="build everything, time a few steps, print images/s, peak memory and the projected wall time "
                        "on 1, 4 and 8 devices, and exit without writing an adapter")
    p.add_argument("--estimate-steps", type=int, default=3, help="timed steps of --estimate (after one warm-up step)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to train (auto: CUDA when present)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH or the ComfyUI this pack is installed in)")
    _add_distributed_arguments(p)
    return p


def _add_distributed_arguments(parser):
    g = parser.add_argument_group("several GPUs / machines (start with torchrun; see docs/training-distributed.md)")
    g.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="images per optimizer step over all ranks (= ranks x --batch-size x --accumulate); --accumulate (or "
        "--batch-size) is derived from it. A resumed run keeps its global batch whatever the number of ranks.",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds a rank waits for the others (rendezvous, each step) (default {DEFAULT_TIMEOUT_S})",
    )
    g.add_argument(
        "--dist-backend", choices=BACKENDS, default="auto", help="auto: NCCL on CUDA GPUs, Gloo with --device cpu"
    )
    return parser


def config_from_args(args: argparse.Namespace, saved: TrainConfig | None = None, world_size: int = 1,
                     saved_world_size: int = 1) -> TrainConfig:
    """``world_size``: ranks of this run; ``saved_world_size``: ranks of the resumed run (its global batch
    ``batch x accumulate x ranks`` is kept, see :func:`dreamcache.apps.train.batch.resolve_batch`)."""
    resolve_batch(args, saved, world_size, saved_world_size)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if saved is None:
        missing = [_ARG_FIELDS[k] for k in ("checkpoint", "data", "out") if not given.get(k)]
        if missing:
            raise DreamCacheError(f"Training needs {', '.join(missing)}; see python -m dreamcache.train --help.")
        return TrainConfig(**given)
    clashes = []
    for k in TrainConfig.IDENTITY:
        if k in ("batch_size", "accumulate"):
            continue  # resolve_batch checked that the global batch stays
        if k in given:
            a, b = given[k], getattr(saved, k)
            if k == "betas":
                a = tuple(a)
            if k in ("data", "precomputed") and a and b:
                same = os.path.abspath(a) == os.path.abspath(b)
            else:
                same = a == b
            if not same:
                clashes.append(f"{_ARG_FIELDS.get(k, k)} {a!r} (the run used {b!r})")
    if clashes:
        raise DreamCacheError("A resumed run keeps its settings, but " + "; ".join(clashes) +
                              " differ; drop those options, or start a new run from this adapter with --init-from.")
    d = saved.to_json()
    d.update(given)
    return TrainConfig.from_json(d)
