"""The DreamCache training engine: a frozen ComfyUI U-Net, trainable adapters, the reference's objective.

One optimizer step = ``accumulate`` micro-batches; per micro-batch, for each sample position p (all randomness
seeded by ``(seed, p)``, so batch 4 equals 2 x accumulate 2 and a resumed run continues bit-identically):

1. target and reference pictures -> VAE -> ``process_latent_in`` (no grad);
2. the cache, under no_grad: the reference latent noised at DDPM t=1 (sigma_1 = ``model_sampling.sigma(1)``),
   context = the encoded empty prompt, adapters off; the inputs of the adapter layers' SpatialTransformers are
   captured (:func:`dreamcache.core.capture.run_and_capture`) and the pass stops there; per-image (reference i
   for target i);
3. t uniform in {0..999}, sigma_t = ``model_sampling.sigma(t)``, x = z + sigma_t * eps, and the U-Net is called
   directly on ``calculate_input(sigma_t, x)`` at ``timestep(sigma_t)`` with the caption's context (dropped to ""
   with p 0.07) and, for SDXL, the ``y`` vector; the DreamCache patch runs in trainable mode (autograd through
   attn_mem, K/V and linear_cat);
4. loss = MSE between the raw U-Net output and its target: eps for eps models, v = sqrt(a)*eps - sqrt(1-a)*x0
   for v-prediction models, with sqrt(a) = 1/sqrt(1+sigma^2) and sqrt(1-a) = sigma/sqrt(1+sigma^2) (ComfyUI's
   own V_PREDICTION parameterisation). Only the adapters have gradients.

Adapter parameters stay fp32 (master weights); bf16/fp16 run the frozen U-Net in that dtype under autocast
(fp16 adds a GradScaler). Gradient checkpointing recomputes every U-Net block in the backward pass.
"""
from __future__ import annotations

import csv
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...comfy.frozen import (
    WEIGHT_DTYPES,
    FrozenParts,
    checkpoint_fingerprint,
    resolve_precision,
)
from ...comfy.loading import check_supported
from ...comfy.model import FAMILY_NAMES, model_channels_at
from ...core.adapter import DreamCacheAdapter
from ...core.adapter_io import adapter_file_of, read_adapter, save_adapter
from ...core.errors import DreamCacheError
from ...core.image import from_uint8
from ...core.layers import NATIVE_RESOLUTION, default_layers, sort_layers
from ...core.patch import DreamCachePatch, PatchEntry
from ...core.subject import subject_reference
from ..data import (
    AugmentConfig,
    TargetGeometry,
    TrainingData,
    batches,
    load_mask,
    load_rgb,
    validate_dataset,
)
from .batch import global_batch
from .config import (
    TrainConfig,
    TrainState,
    checkpoint_path,
    layer_names,
    log_path,
    preview_path,
    save_state,
    state_path_for,
)
from .draws import sample_noise
from .parallel import DistContext

# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing of the frozen U-Net


@contextmanager
def checkpointed_unet(enabled: bool = True):
    """While active, every block of ComfyUI's UNetModel (input, middle and output blocks) runs under
    ``torch.utils.checkpoint`` (non-reentrant): its activations are dropped and recomputed in the backward pass.

    ComfyUI has no option for this in inference code, so the module-level ``forward_timestep_embed`` that
    ``UNetModel._forward`` calls per block is swapped for the duration (and always restored). Each block gets a
    snapshot of ``transformer_options`` so the recomputation sees the same block id and patch plan."""
    if not enabled:
        yield
        return
    from comfy.ldm.modules.diffusionmodules import openaimodel

    original = openaimodel.forward_timestep_embed

    def forward_timestep_embed(ts, x, emb, context=None, transformer_options={}, *args, **kwargs):
        if not torch.is_grad_enabled():
            return original(ts, x, emb, context, transformer_options, *args, **kwargs)
        snapshot = dict(transformer_options)
        after = {}

        def run(x, emb, context):
            to = dict(snapshot)
            out = original(ts, x, emb, context, to, *args, **kwargs)
            after.clear()
            after.update(to)
            return out

        out = torch.utils.checkpoint.checkpoint(run, x, emb, context, use_reentrant=False)
        transformer_options.update(after)  # e.g. transformer_index, as the plain call would have left it
        return out

    openaimodel.forward_timestep_embed = forward_timestep_embed
    try:
        yield
    finally:
        openaimodel.forward_timestep_embed = original


# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One micro-batch, encoded (everything here is constant w.r.t. the adapters)."""

    latents: torch.Tensor  # (B, 4, h, w), process_latent_in applied, on the device, fp32
    noise: torch.Tensor  # (B, 4, h, w)
    t: torch.Tensor  # (B,) int64
    context: torch.Tensor  # (B, T, C)
    y: torch.Tensor | None  # SDXL's vector conditioning
    cache: object  # FeatureCache, per image
    positions: list[int]


class Trainer:
    """Trains the adapters of ``model`` (a ComfyUI ModelPatcher) with ``clip`` and ``vae``.

    ``data``: a :class:`TrainingData` (default: built from ``config.data``). ``state``: a :class:`TrainState` to
    resume from (its adapter file is loaded, optimizer, scaler and RNG restored). ``dist``: this rank's
    :class:`~dreamcache.apps.train.parallel.DistContext` in a data-parallel run (default: a single process)."""

    def __init__(self, model, clip, vae, config: TrainConfig, data: TrainingData | None = None,
                 checkpoint_name: str | None = None,
                 state: TrainState | None = None, log=print, dist: DistContext | None = None):
        import comfy.model_base
        import comfy.model_management as mm

        self.log = log
        self.dist = dist if dist is not None else DistContext.single()
        self.model, self.clip, self.vae = model, clip, vae
        self.family = check_supported(model, checkpoint_name or "the model")
        if clip is None or vae is None:
            raise DreamCacheError("Training needs the checkpoint's CLIP and VAE as well as its U-Net; load a full "
                                  "checkpoint.")
        self.device = torch.device(model.load_device)
        config.precision = resolve_precision(config.precision, self.device.type)
        if not config.resolution:
            config.resolution = NATIVE_RESOLUTION[self.family]
        if config.checkpoint == "" and checkpoint_name:
            config.checkpoint = checkpoint_name
        self.cfg = config
        self.checkpoint_name = checkpoint_name or os.path.basename(config.checkpoint or "") or None
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.ms = model.get_model_object("model_sampling")
        self.v_prediction = self.base.model_type == comfy.model_base.ModelType.V_PREDICTION
        self.autocast_dtype = None if config.precision == "fp32" else WEIGHT_DTYPES[config.precision]
        mm.load_models_gpu([model], force_full_load=True)
        self.unet.requires_grad_(False)
        self.compute_dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        self.frozen = FrozenParts(model, clip, vae, self.device, self.family, self.autocast_dtype)

        self.init_origin = None
        self.last_eval = None  # the latest --eval-every scores (recorded in the adapter's metadata)
        self._step_times = []
        self.adapter = self._build_adapter(state)
        self.params = [p for _, p in self.adapter.named_parameters()]
        self.param_names = [n for n, _ in self.adapter.named_parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.step = 0
        self.checkpoint_hash = checkpoint_fingerprint(model, clip, vae)
        if data is None:
            main = self.dist.is_main
            check = config.validate_files and not config.precomputed  # a precomputed run reads no picture
            index = validate_dataset(config.data, check_files=check, progress=config.progress and main,
                                     report=f"{os.path.splitext(config.out)[0]}.dataset-problems.txt" if main else None)
            aug = AugmentConfig(resolution=config.resolution, caption_dropout=config.caption_dropout,
                                augment=config.augment)
            data = TrainingData(index, aug, seed=config.seed)
        elif data.cfg.resolution != config.resolution:
            raise DreamCacheError(f"The data is prepared at {data.cfg.resolution} px but the run trains at "
                                  f"{config.resolution} px.")
        if config.precomputed:
            from .precomputed import attach_precomputed

            data = attach_precomputed(self, data)
        self.data = data
        self._dataset_hash = None
        self._stream = None
        if state is not None:
            self._restore(state)
        self.dist.start(self)
        self._eval = None
        if config.eval_every and self.dist.is_main:  # --eval-every: DreamBench and metric models checked up front
            from .evaluation import TrainingEval

            self._eval = TrainingEval(config)

    # ---- setup ------------------------------------------------------------------------------------------------------
    def _build_adapter(self, state: TrainState | None) -> DreamCacheAdapter:
        cfg = self.cfg
        source = state.adapter_file if state is not None else cfg.init_from
        refs = cfg.layer_refs()
        if source:
            af = read_adapter(source)
            if refs is not None and set(refs) != set(af.layers):
                raise DreamCacheError(
                    f"--layers {', '.join(map(str, refs))} differ from the layers of '{af.name}' "
                    f"({', '.join(map(str, af.layers))}); drop --layers to fine-tune it.")
            refs = list(af.layers)
            self.init_origin = self._init_origin(af, state)
        elif refs is None:
            refs = list(default_layers(self.family))
        channels = {}
        missing = []
        for r in refs:
            c = model_channels_at(self.model, r)
            if c is None:
                missing.append(str(r))
            channels[r] = c
        if missing:
            raise DreamCacheError(f"This {FAMILY_NAMES[self.family]} model has no transformer block at "
                                  f"{', '.join(missing)}; pick layers it has (--layers).")
        cfg.layers = layer_names(sort_layers(refs))
        module = DreamCacheAdapter(channels)
        if source:
            module.load_reference_state_dict({r: {k: v.float() for k, v in p.items()} for r, p in af.tensors.items()})
        else:
            module.reset_reference_init(cfg.seed)
            if cfg.init == "identity":
                module.make_identity()
        module = module.to(self.device, torch.float32)
        module.requires_grad_(True)
        return module.train()

    def _init_origin(self, af, state: TrainState | None) -> dict | None:
        """What the run started from (recorded in every adapter it writes): ``--init-from``'s file, family and
        step, after checking that every tensor fits (another family's adapter is accepted, with one line)."""
        from ...comfy.model import check_adapter_fits, check_init_fits

        if state is not None:  # a resumed run: its own checkpoint, which recorded the origin
            import json

            check_adapter_fits(self.model, af)
            self.last_eval = json.loads(af.metadata.get("evaluation", "null"))  # until the next --eval-every
            return json.loads(af.metadata.get("init_origin", "null"))

        note = check_init_fits(self.model, af)
        if note and self.dist.is_main:
            self.log(note)
        return {"file": os.path.basename(self.cfg.init_from), "family": af.family or "unknown",
                "step": af.metadata.get("step", ""), "base_checkpoint": af.metadata.get("base_checkpoint", "")}

    def _restore(self, state: TrainState):
        if state.param_names != self.param_names:
            raise DreamCacheError("The training state's parameters do not match the adapter's; resume with the files "
                                  "of one run.")
        sd = {"state": state.optimizer["state"],
              "param_groups": [{**g, "params": list(range(len(self.params)))} for g in state.optimizer["param_groups"]]}
        self.optimizer.load_state_dict(sd)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        if "torch_cpu" in state.rng:
            torch.set_rng_state(state.rng["torch_cpu"])
        if torch.cuda.is_available() and not self.dist.enabled:  # (a rank touches only its own GPU)
            cuda = [state.rng[k] for k in sorted(state.rng) if k.startswith("cuda.")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        self.step = state.step

    # ---- encoding (the frozen parts: dreamcache.comfy.frozen) --------------------------------------------------------
    def _autocast(self):
        return self.frozen.autocast()

    def _ensure_loaded(self):
        self.frozen.ensure_loaded()

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, list]:
        return self.frozen.encode_text(captions)

    def empty_prompt(self):
        return self.frozen.empty_prompt()

    def vector_cond(self, pooled: list, geometry: list[TargetGeometry] | None, size: int) -> torch.Tensor | None:
        """SDXL's ``y``: pooled text embedding + size / crop embeddings (None for SD1/SD2)."""
        return self.frozen.vector_cond(pooled, geometry, size)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.frozen.encode_pixels(pixels)

    def unet_call(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y,
                  transformer_options: dict) -> torch.Tensor:
        """The raw U-Net output (eps or v) at ComfyUI sigma ``sigma`` for the noisy latent ``x``."""
        return self.frozen.unet_call(x, sigma, context, y, transformer_options)

    def build_cache(self, ref_latents: torch.Tensor, ref_noise: torch.Tensor):
        """Per-image cache: the reference latents noised at t=1, empty prompt, adapters off, pass stopped early."""
        return self.frozen.build_cache(ref_latents, ref_noise, self.adapter.layers, self.cfg.resolution)

    @torch.no_grad()
    def prepare(self, batch: dict) -> Prepared:
        if "latent" in batch:  # a precomputed set's samples (--precomputed): nothing frozen runs
            from .precomputed import stored_parts

            return Prepared(**stored_parts(self, batch))
        self._ensure_loaded()
        latents = self.encode_pixels(batch["target"])
        ref_latents = self.encode_pixels(batch["reference"])
        ts, noise, ref_noise = sample_noise(self.cfg.seed, batch["position"], latents.shape[1:])
        if not self.cfg.augment:  # one fixed reference per item: its noise too, as a precomputed set stores it
            from ..data.precompute import reference_noise

            ref_noise = torch.stack([reference_noise(self.cfg.seed, n, 0, latents.shape[1:]) for n in batch["name"]])
        noise = noise.to(self.device)
        ref_noise = ref_noise.to(self.device)
        self._ensure_loaded()
        cache = self.build_cache(ref_latents, ref_noise)
        ctx, pooled = self.encode_text(batch["caption"])
        y = self.vector_cond(pooled, batch.get("geometry"), self.cfg.resolution)
        return Prepared(latents, noise, ts, ctx.to(self.device), y, cache, list(batch["position"]))

    # ---- loss and steps ---------------------------------------------------------------------------------------------
    def loss(self, prep: Prepared) -> torch.Tensor:
        """MSE between the U-Net's raw output and its eps (or v) target, with gradients into the adapters."""
        sigma = self.ms.sigma(prep.t.to(self.device).float()).to(torch.float32)
        s = sigma.view(-1, 1, 1, 1)
        x = prep.latents + s * prep.noise
        if self.v_prediction:
            target = (prep.noise - s * prep.latents) / torch.sqrt(1.0 + s * s)
        else:
            target = prep.noise
        patch = DreamCachePatch([PatchEntry(self.adapter, prep.cache)], trainable=True)
        with self._autocast(), checkpointed_unet(self.cfg.gradient_checkpointing):
            out = self.unet_call(x, sigma, prep.context, prep.y, patch.transformer_options())
        return F.mse_loss(out.float(), target)

    def next_batch(self) -> dict:
        if self._stream is None:
            start = self.step * global_batch(self.cfg, self.dist.world_size)
            workers = self.cfg.num_workers
            if self.dist.enabled:  # this rank's share of every global batch
                self._stream = self.dist.batches(self.data, self.cfg.batch_size, start, num_workers=workers)
            else:
                self._stream = batches(self.data, self.cfg.batch_size, start_position=start, num_workers=workers)
        return next(self._stream)

    def accumulate(self, micro_batches=None) -> float:
        """Forward and backward over one step's micro-batches (gradients summed into ``.grad``, each loss divided
        by the number of micro-batches, so the gradient is that of the mean loss). Returns the mean loss."""
        n = self.cfg.accumulate if micro_batches is None else len(micro_batches)
        total = 0.0
        for i in range(n):
            batch = self.next_batch() if micro_batches is None else micro_batches[i]
            prep = batch if isinstance(batch, Prepared) else self.prepare(batch)
            loss = self.loss(prep) / n
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(loss.detach())
        return total

    def optimizer_step(self) -> float | None:
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    def train_step(self, micro_batches=None) -> tuple[float, float | None]:
        try:
            with self.dist.step_guard(self.step + 1):
                loss = self.accumulate(micro_batches)
                n = self.cfg.accumulate if micro_batches is None else len(micro_batches)
                # several ranks: gradients averaged over them, the global mean loss (one process: unchanged)
                loss = self.dist.reduce_step(self.params, loss, self.step + 1, images=n * self.cfg.batch_size)
                if not math.isfinite(loss) and self.scaler is None:
                    raise DreamCacheError(f"The loss became {loss} at step {self.step + 1}; lower --lr or use "
                                          "--precision fp32/bf16.")
                return loss, self.optimizer_step()
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            raise DreamCacheError(
                f"Out of memory at batch size {self.cfg.batch_size} and {self.cfg.resolution} px; lower --batch-size "
                "and raise --accumulate (the effective batch is batch x accumulate), add --gradient-checkpointing, "
                "or use --precision bf16.") from None

    # ---- files ------------------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """The adapter's metadata (beside the format's own: family, layers): what it was trained on and how, for
        ``python -m dreamcache info`` and model cards (:mod:`dreamcache.core.provenance`)."""
        from ...core.provenance import training_metadata

        cfg = self.cfg
        index = self.data.index
        from ..data.precompute import dataset_fingerprint

        if self._dataset_hash is None:
            self._dataset_hash = dataset_fingerprint(index)
        return {"step": self.step, "config": cfg.to_json(), "base_checkpoint": self.checkpoint_name or "",
                "objective": "v" if self.v_prediction else "eps", "trained_by": "python -m dreamcache.train",
                **training_metadata(checkpoint_hash=self.checkpoint_hash, dataset_items=len(index),
                                    dataset_objects=len(index.objects), dataset_hash=self._dataset_hash,
                                    steps=self.step, global_batch=global_batch(cfg, self.dist.world_size),
                                    resolution=cfg.resolution, init_origin=self.init_origin,
                                    evaluation=self.last_eval, precomputed=bool(cfg.precomputed))}

    def rng_state(self) -> dict:
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and not self.dist.enabled:
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i:02d}"] = s
        return rng

    def save(self, path: str | None = None) -> tuple[str, str]:
        """Write the adapter (fp32, the pack's format) and its training state; returns both paths."""
        path = path or checkpoint_path(self.cfg.out, self.step)
        if not self.dist.is_main:  # rank 0 writes the files of a data-parallel run
            return path, state_path_for(path)
        save_adapter(path, self.adapter, family=self.family, extra_metadata=self.metadata())
        state = TrainState(step=self.step, config=self.cfg, adapter_file=path, param_names=self.param_names,
                           optimizer=self.optimizer.state_dict(),
                           scaler=self.scaler.state_dict() if self.scaler is not None else None,
                           rng=self.rng_state(),
                           extra={"positions_consumed": self.step * global_batch(self.cfg, self.dist.world_size)})
        if self.dist.enabled:  # what a resume with another number of ranks needs
            state.extra.update(global_batch=global_batch(self.cfg, self.dist.world_size),
                               world_size=self.dist.world_size)
        spath = state_path_for(path)
        save_state(spath, state)
        return path, spath

    def _open_log(self):
        if not self.dist.is_main:
            f = open(os.devnull, "w", encoding="utf-8")
            return f, csv.DictWriter(f, fieldnames=["step"], extrasaction="ignore")
        path = log_path(self.cfg.out)
        rows = []
        if os.path.exists(path):
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= self.step]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(path, "w", newline="", encoding="utf-8")
        fields = ["step", "loss", "lr", "grad_norm", "seconds", "images_per_second"]
        w = csv.DictWriter(f, fieldnames=self.dist.log_fields(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in w.fieldnames})
        f.flush()
        return f, w

    # ---- preview ----------------------------------------------------------------------------------------------------
    def preview_inputs(self) -> tuple[torch.Tensor, str]:
        """The fixed preview subject and prompt. With a mask the reference is made as SubjectMask makes it (mask
        mode, the ``train`` layout at the training resolution); without one the photo is used as it is."""
        cfg = self.cfg
        first = self.data.index.objects[0][1][0]
        if cfg.preview_reference:
            rgb = load_rgb(cfg.preview_reference)
            mask = load_mask(cfg.preview_mask) if cfg.preview_mask else None
        else:
            rgb, mask = load_rgb(first.image), load_mask(first.mask)
        image = from_uint8(rgb)
        if mask is not None:
            if mask.shape != rgb.shape[:2] or not mask.any():
                raise DreamCacheError("The preview mask is empty or does not match the preview image's size; pass a "
                                      "matching --preview-mask.")
            image, _ = subject_reference(image, "mask", mask=torch.from_numpy(mask).float()[None], layout="train",
                                         size=cfg.resolution)
        prompt = cfg.preview_prompt
        if prompt is None:
            prompt = first.caption.read_text(encoding="utf-8").strip()
        return image, prompt

    def preview(self, path: str | None = None, seed: int = 0) -> str:
        """Render the fixed reference and prompt with the current adapter through the pack's inference pipeline
        (:func:`dreamcache.comfy.pipeline.personalised_images`: combined guidance, Euler); writes a PNG."""
        from PIL import Image

        from ...comfy.pipeline import personalised_images

        path = path or preview_path(self.cfg.out, self.step)
        image, prompt = self.preview_inputs()
        af = adapter_file_of(self.adapter, self.family, name=f"step {self.step}")
        cfg = self.cfg
        pixels = personalised_images(self.model, self.clip, self.vae, image, af, prompt, cfg.resolution, seeds=[seed],
                                     steps=cfg.preview_steps, sampler_name="euler", scheduler="normal",
                                     text_scale=cfg.preview_text_scale, image_scale=cfg.preview_image_scale,
                                     cache_seed=seed)[0, ..., :3]
        self._ensure_loaded()
        Image.fromarray((pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()).save(path)
        return path

    def evaluate(self) -> dict:
        """--eval-every: DINO / CLIP-I / CLIP-T of the current adapter on a few DreamBench images (apps.eval)."""
        from .evaluation import evaluate_during_training

        overall = evaluate_during_training(self)
        self.last_eval = {"step": self.step, **{k: v for k, v in dict(overall).items() if v is not None}}
        return overall

    def _eta(self, seconds: float, total: int) -> str:
        """The rest of the run at the images/s of the last steps (the first, warm-up, step left out once there are
        others): :func:`.estimate.projected_seconds`, as ``--estimate`` projects it."""
        from .estimate import format_duration, projected_seconds

        times = self._step_times
        times.append(seconds)
        recent = times[1:][-20:] or times
        batch = global_batch(self.cfg, self.dist.world_size)
        return format_duration(projected_seconds(batch * len(recent) / sum(recent), total - self.step, batch))

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def run(self, steps: int | None = None) -> list[float]:
        """Train until ``steps`` (default: ``config.steps``) total optimizer steps, writing checkpoints, the loss log
        and previews; the final adapter goes to ``config.out``. Returns this call's losses."""
        cfg = self.cfg
        total = cfg.steps if steps is None else steps
        losses = []
        f, writer = self._open_log()
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        try:
            while self.step < total:
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step()
                dt = time.perf_counter() - t0
                losses.append(loss)
                writer.writerow({"step": self.step, "loss": f"{loss:.6g}",
                                 "lr": f"{self.optimizer.param_groups[0]['lr']:.3g}",
                                 "grad_norm": "" if grad_norm is None else f"{grad_norm:.4g}", "seconds": f"{dt:.4f}",
                                 "images_per_second": f"{global_batch(cfg, self.dist.world_size) / dt:.3f}",
                                 **self.dist.step_record(dt)})
                f.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", eta=self._eta(dt, total))
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                    self.save()
                if cfg.preview_every and self.step % cfg.preview_every == 0 and self.dist.is_main:
                    self.preview()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.dist.is_main:
                    self.evaluate()
        finally:
            f.close()
            if bar is not None:
                bar.close()
            self._stream = None
        self.save(cfg.out)
        if self.dist.is_main and losses:
            self.log(self.dist.summary(global_batch(cfg, self.dist.world_size)))
        return losses
