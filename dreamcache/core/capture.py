"""Capture the inputs of chosen modules during one forward pass, then stop the pass early.

ComfyUI has no patch point that sees a SpatialTransformer's input (the raw ResBlock output, before the
transformer's GroupNorm and proj_in), so the cache pass registers PyTorch forward pre-hooks on exactly those
modules for the duration of the pass and removes them in ``finally``. Nothing in the model changes: parameters,
LoRA weight patches and ComfyUI's patch lists are untouched. Once every module has been seen the pass is
stopped (:class:`StopPass`), which skips the rest of the U-Net (the costliest, highest-resolution blocks).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import DreamCacheError


class StopPass(Exception):
    """Raised from a capture hook once every wanted input has been captured."""


@contextmanager
def capture_inputs(modules: dict, stop_when_complete: bool = True):
    """``with capture_inputs({key: module}) as got:`` run the model; ``got[key]`` is the module's first input.

    Callers that run the model catch :class:`StopPass` themselves (see :func:`run_and_capture`).
    """
    got: dict = {}
    handles = []

    def make(key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("x")
            if not isinstance(x, torch.Tensor):
                raise DreamCacheError(f"Could not read the input of {key} during the cache pass.")
            if key in got:
                raise DreamCacheError(f"{key} ran twice in one cache pass; another node changed the model's structure.")
            got[key] = x.detach().clone()
            if stop_when_complete and len(got) == len(modules):
                raise StopPass()

        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_pre_hook(make(key), with_kwargs=True))
        yield got
    finally:
        for h in handles:
            h.remove()


def run_and_capture(modules: dict, run, stop_when_complete: bool = True) -> dict:
    """Call ``run()`` with capture hooks on ``modules``; return the captured inputs (every one is required)."""
    with capture_inputs(modules, stop_when_complete) as got:
        try:
            run()
        except StopPass:
            pass
    missing = [str(k) for k in modules if k not in got]
    if missing:
        raise DreamCacheError(
            f"The cache pass never reached {', '.join(missing)}; the model does not run those layers (is it an SD "
            "U-Net?)."
        )
    return dict(got)
