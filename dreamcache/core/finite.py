"""Where the numbers first go bad (NaN or inf), and the one sentence that says so.

A black or noisy image usually means a NaN somewhere upstream: a text encoder or VAE that did not load (ComfyUI then
samples from uninitialised weights and logs ``clip missing: [...]``, ``unet missing: [...]`` or ``Missing VAE
keys [...]``), or fp16 overflowing in attention or in the VAE on some GPUs and models. Every check of the pack lives
here, with its message, so each node names itself, what was not finite, the likely causes and what to try:

* the cache pass (:func:`check_cache_pass`): a non-finite cache is never returned;
* sampling (:func:`checked_apply_model`): once per sampling run, on the first model call, the prediction is checked
  (one host read per run, outside any compiled graph); only when it is not finite does a diagnosis run: the input
  latent and the text conditioning, the base model alone (DreamCache off: then it is the base model, not
  DreamCache), and finally the patched layers one by one (:func:`check_layer`, the first layer whose output is not
  finite although the base block's was);
* Subject Mask (:func:`check_tensor` on its inputs, SAM's output and its outputs);
* the attention recording (:func:`check_recording`) and its overlay.

Nothing here runs on the per-layer hot path of an ordinary sampling step. No ComfyUI import (core layer).
"""
from __future__ import annotations

import torch

from .errors import DreamCacheError
from .layers import layer_name

#: What to try for each likely cause (pieces of the one sentence).
LOG_HINT = ("look in ComfyUI's log for 'clip missing:', 'unet missing:' or 'Missing VAE keys' lines, which mean that "
            "part of the checkpoint did not load")
FP16_HINT = ("fp16 overflow: start ComfyUI with --force-upcast-attention (attention) or --fp32-vae (VAE), or run the "
             "model in bf16 (--bf16-unet) or fp32 (--fp32-unet)")
TEXT_HINT = ("the text encoder did not load (ComfyUI logs 'clip missing:' for it): use a checkpoint with its text "
             "encoder or load the CLIP separately")
VAE_HINT = ("a VAE that did not load (ComfyUI logs 'Missing VAE keys') or overflows in fp16: load the VAE separately "
            "or start ComfyUI with --fp32-vae")


class NonFiniteError(DreamCacheError):
    """A NaN or inf found by one of the checks of this module."""


NonFiniteError.__module__ = "dreamcache"


def what_is_bad(t: torch.Tensor) -> str | None:
    """None when ``t`` is finite (or not floating point), else ``"NaN"``, ``"inf"`` or ``"NaN and inf"`` (one host
    read)."""
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    # a finite sum means every element is finite (one NaN or inf makes the sum NaN or inf); the sum allocates
    # nothing the size of t (isfinite would, several times over: 500 MB for a 6000x4000 photo)
    if bool(torch.isfinite(t.sum())):
        return None
    nan = inf = False  # the sum overflowed or something is not finite: look, a slice at a time
    flat = t.reshape(-1) if t.is_contiguous() else t.flatten()
    for i in range(0, flat.numel(), _CHUNK):
        part = flat[i:i + _CHUNK]
        nan = nan or bool(torch.isnan(part).any())
        inf = inf or bool(torch.isinf(part).any())
    if not (nan or inf):
        return None
    return "NaN and inf" if nan and inf else ("NaN" if nan else "inf")


_CHUNK = 1 << 22


def sentence(node: str, what: str, bad: str, causes: str, tries: str = "") -> str:
    """The one sentence: ``<node>: <what> holds <bad> values; <causes>[; <tries>].``"""
    text = f"{node}: {what} holds {bad} values; {causes}"
    if tries:
        text += f"; {tries}"
    return text.rstrip(".") + "."


def check_tensor(t, node: str, what: str, causes: str, tries: str = ""):
    """Raise :class:`NonFiniteError` (the sentence of :func:`sentence`) when ``t`` holds NaN or inf."""
    bad = what_is_bad(t)
    if bad is not None:
        raise NonFiniteError(sentence(node, what, bad, causes, tries))


def upstream(input_name: str, kind: str) -> str:
    """The causes clause for an input that arrived non-finite: the node before produced it."""
    return (f"the node connected to {input_name} produced them, so the problem is upstream of this node ({kind} "
            f"from a model that did not load or overflowed, e.g. a VAE Decode: {VAE_HINT}; {LOG_HINT})")


# ---- Build Feature Cache ------------------------------------------------------------------------------------------

CACHE_NODE = "Build Feature Cache (DreamCache)"


def check_cache_inputs(pixels: torch.Tensor, node: str = CACHE_NODE):
    check_tensor(pixels, node, "the reference IMAGE", upstream("image", "an IMAGE"))


def check_cache_pass(captured: dict, latent: torch.Tensor, cond_tensor, node: str = CACHE_NODE):
    """After the cache pass: every captured feature map must be finite. When one is not, the sentence says why:
    the VAE's latent, the conditioning, or the base model's own pass (DreamCache is off during it)."""
    bad_layer = next(((ref, bad) for ref, x in captured.items() if (bad := what_is_bad(x)) is not None), None)
    if bad_layer is None:
        return
    check_tensor(latent, node, "the VAE's latent of the reference", "the VAE made them from a finite image",
                 VAE_HINT)
    if isinstance(cond_tensor, torch.Tensor):
        check_tensor(cond_tensor, node, "the conditioning of the cache pass", TEXT_HINT)
    ref, bad = bad_layer
    raise NonFiniteError(sentence(
        node, f"the base model's features at layer {getattr(ref, 'module', ref)} in the cache pass", bad,
        "the base model itself produced them from a finite latent and prompt (DreamCache's adapters are off in this "
        f"pass, so it is the base model, not DreamCache): the U-Net may not have loaded ({LOG_HINT}) or {FP16_HINT}",
        "no cache was made"))


def check_cache(tokens: dict, source: str, node: str,
                causes: str = "it was saved from a broken cache pass or the file is damaged",
                tries: str = "build the cache again with Build Feature Cache"):
    """A cache's tokens ({LayerRef: tensor}) read from a file or about to be saved: every layer finite."""
    for ref, t in tokens.items():
        check_tensor(t, node, f"{source} at layer {getattr(ref, 'module', ref)}", causes, tries)


# ---- sampling -----------------------------------------------------------------------------------------------------

SAMPLING_NODE = "DreamCache (sampling with Apply DreamCache's MODEL)"


class RunCheck:
    """Remembers which sampling runs were checked (a run is one ``sample_sigmas`` schedule); shared by the clones
    of one patch."""

    __slots__ = ("_last",)

    def __init__(self):
        self._last = None

    def first_call(self, to: dict) -> bool:
        """True on the first model call of a sampling run; False for later calls and for calls outside a sampler
        (no ``sample_sigmas``: training, direct calls)."""
        schedule = to.get("sample_sigmas")
        if schedule is None:
            return False
        if schedule is self._last:
            return False
        self._last = schedule
        return True


def checked_apply_model(patch, executor, x, t, c_concat, c_crossattn, control, to, kwargs, plan_arg, disable_key):
    """The pre-planner's model call with the once-per-run check: ``executor(...)`` as usual; on the first call of a
    sampling run the prediction is checked and, when it is not finite, :func:`diagnose` raises the sentence."""
    out = executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
    if patch.run_check.first_call(to):
        bad = what_is_bad(out)
        if bad is not None:
            diagnose(patch, executor, x, t, c_concat, c_crossattn, control, to, kwargs, plan_arg, disable_key, bad)
    return out


def diagnose(patch, executor, x, t, c_concat, c_crossattn, control, to, kwargs, plan_arg, disable_key,
             bad: str = "NaN"):
    """Why the first prediction of a run is not finite: the input latent, the conditioning, the base model alone
    (DreamCache off), or the first patched layer that turns a finite block output into NaN. Always raises."""
    node = SAMPLING_NODE
    check_tensor(x, node, "the LATENT given to the sampler",
                 "the node that made it produced them (a VAE Encode of a broken image, or a latent from a model that "
                 f"did not load: {LOG_HINT})", "check the LATENT's source")
    check_tensor(c_crossattn, node, "the text conditioning (CONDITIONING) of the sampler", TEXT_HINT)
    check_tensor(kwargs.get("y"), node, "the pooled text conditioning (SDXL's y) of the sampler", TEXT_HINT)
    base_to = dict(to)
    base_to[disable_key] = True  # every DreamCache hook off: the base model alone
    base_kwargs = {k: v for k, v in kwargs.items() if k != plan_arg}
    base = executor(x, t, c_concat, c_crossattn, control, base_to, **base_kwargs)
    base_bad = what_is_bad(base)
    if base_bad is not None:
        raise NonFiniteError(sentence(
            node, "the base model's own prediction at the first step (with DreamCache off)", base_bad,
            "so the base model, not DreamCache, makes the image black or noisy: the U-Net or text encoder may not have "
            f"loaded ({LOG_HINT}) or {FP16_HINT}", "bypass Apply DreamCache to see the same"))
    pre = kwargs.get(plan_arg)
    if pre is not None:  # again with a plan that checks every patched layer (check_layer raises at the first bad one)
        p = pre[1]
        checked = type(p)(p.layers, p.rows, p.ordered, p.zero, p.record, True)
        executor(x, t, c_concat, c_crossattn, control, to, **{**kwargs, plan_arg: (pre[0], checked)})
    weights = adapter_weights_bad(patch)
    raise NonFiniteError(sentence(
        node, "DreamCache's prediction at the first step", bad,
        "the base model alone is finite, so DreamCache's adapter makes them"
        + (f" (its weights hold NaN or inf: {weights}; the adapter file is damaged)" if weights else
           f", through {FP16_HINT}, or because its strength or weights are far out of range"),
        "re-download or retrain the adapter, lower the strength, or run in bf16 or fp32"))


def adapter_weights_bad(patch) -> str | None:
    """The first adapter parameter holding NaN/inf, as ``'<adapter>' <parameter>``, or None."""
    for e in patch.entries:
        for name, p in e.adapter.named_parameters():
            if what_is_bad(p) is not None:
                return f"'{e.name}' {name}"
    return None


def check_layer(works, x: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
    """Diagnosis only (a checking plan): ``x + a`` is what the base block would give, ``out`` what the patch gives.
    Raises when the base block's output is finite and the patched one is not."""
    if what_is_bad(x + a) is not None:
        return  # not ours: the base block already is not finite here (the base model is checked separately)
    bad = what_is_bad(out)
    if bad is None:
        return
    w = next((b for b in map(adapter_weights_bad_of, works) if b), None)
    raise NonFiniteError(sentence(
        SAMPLING_NODE, f"the output of patched layer {layer_name(works[0].ref)} at the first step", bad,
        "the base block's output there is finite, so DreamCache's adapter makes them"
        + (f" (its weights hold NaN or inf: {w}; the adapter file is damaged)" if w else f" ({FP16_HINT})"),
        "re-download or retrain the adapter, lower the strength, or run in bf16 or fp32"))


def adapter_weights_bad_of(work) -> str | None:
    for pname, p in work.layer.named_parameters():
        if what_is_bad(p) is not None:
            return pname
    if work.k is not None and what_is_bad(work.k) is not None:
        return "the cached K (the cache holds NaN)"
    return None


# ---- Subject Mask -------------------------------------------------------------------------------------------------

SUBJECT_NODE = "Subject Mask (DreamCache)"


def check_subject_image(images: torch.Tensor):
    check_tensor(images, SUBJECT_NODE, "the image input", upstream("image", "an IMAGE"))


def check_subject_mask_input(mask):
    if isinstance(mask, torch.Tensor):
        check_tensor(mask, SUBJECT_NODE, "the mask input", upstream("mask", "a MASK"))


def check_segmenter(probs: torch.Tensor):
    check_tensor(probs, SUBJECT_NODE, "SAM's mask", "the SAM checkpoint is damaged or SAM overflowed in fp16 on this "
                 "GPU", "re-download the SAM checkpoint, or use prompt_mode 'mask' with another segmenter's MASK")


# ---- attention recording and its overlay --------------------------------------------------------------------------

RECORDER_NODE = "DreamCache Attention Recorder"
SHOW_NODE = "Show DreamCache Attention"


def check_recording(x: torch.Tensor, probs: torch.Tensor, layer: str):
    """While recording (one layer at one step): the tokens entering the layer, then the attention probabilities.
    Inside a compiled graph nothing is checked (a host read would break the graph); Show DreamCache Attention checks
    the recording then."""
    if torch.compiler.is_compiling():
        return
    check_tensor(x, RECORDER_NODE, f"the input of layer {layer} at the recorded step",
                 "the model's stream is already broken before DreamCache's adapter at that layer (the base model or an "
                 f"earlier layer: {LOG_HINT}; or {FP16_HINT})", "the sampled image is black or noisy too")
    check_tensor(probs, RECORDER_NODE, f"the adapter attention at layer {layer}",
                 f"the input of the layer is finite, so DreamCache's adapter attention overflowed ({FP16_HINT})",
                 "or the adapter's weights are damaged: re-download it")


def check_show_inputs(probs: torch.Tensor, image: torch.Tensor, reference: torch.Tensor, mask=None,
                      point_x: float = 0.5, point_y: float = 0.5):
    """Before drawing: nothing non-finite is ever cast to a colour index."""
    check_tensor(probs, SHOW_NODE, "the recording", "the attention was recorded from a broken sampling run",
                 "fix the sampling first (see the sampler's error) and sample again")
    check_tensor(image, SHOW_NODE, "the image input", "the generated image is broken (black or noisy): "
                 f"{VAE_HINT}; {LOG_HINT}")
    check_tensor(reference, SHOW_NODE, "the reference input", upstream("reference", "an IMAGE"))
    if isinstance(mask, torch.Tensor):
        check_tensor(mask, SHOW_NODE, "the reference_mask input", upstream("reference_mask", "a MASK"))
    for name, v in (("point_x", point_x), ("point_y", point_y)):
        if not (isinstance(v, (int, float)) and v == v and abs(v) != float("inf") and 0.0 <= v <= 1.0):
            raise NonFiniteError(f"{SHOW_NODE}: {name} is {v}; give a number between 0 and 1.")
