"""The adapter's attention between the generated image and the cached reference (paper Fig. 5), opt-in.

An :class:`AttentionRecorder` on a :class:`~.patch.DreamCachePatch` keeps, for one patched layer at one sampling
step, the head-averaged attention probabilities ``P[b, n, m]`` of the adapter's cross-attention: query token n of
generated image b over cached reference token m (``softmax(q kᵀ/√d)`` with q = to_q(norm2_mem(x)), as
``attn_mem`` computes them). The probabilities are computed explicitly only at that layer and step, next to the
normal (fused) attention kernel, so the sampled image is the same with or without the recorder; a patch without
a recorder runs no extra operation at all.

Two maps are read from P:

* **subject map** (over the generated image): ``Σ_m P[n, m]·subject(m)``, the share of each location's attention
  that goes to the subject's part of the reference (``subject`` = the reference's subject mask pooled to its token
  grid);
* **point map** (over the reference): ``P[n*, m]`` for the query token n* under a chosen point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import DreamCacheError
from .finite import check_recording
from .hooks import HookData
from .layers import LayerRef, layer_name
from .regional import token_grid


@dataclass
class Record:
    """What one subject's adapter did at the recorded layer and step."""

    probs_sum: torch.Tensor  # (B, N, M) float32 on the CPU, summed over the positive prompt's chunks/calls
    count: int
    grid: tuple[int, int]  # (h, w) of the generated image's tokens at this layer
    latent: tuple[int, int] | None  # (H, W) of the latent
    ref_grid: tuple[int, int]  # (h, w) of one reference's tokens
    references: int  # reference images behind the M tokens (concatenated), or 1 for a per-image cache
    per_image: bool
    name: str

    @property
    def probs(self) -> torch.Tensor:
        return self.probs_sum / self.count


class AttentionRecorder:
    """Records layer ``layer`` at the step ``step_percent`` of the sampling schedule (0 = first step, 1 = last),
    for the rows of the positive prompt (cond position 0) with the image condition on. A new sampling run (a new
    ``sample_sigmas`` schedule) starts a new recording; outside a sampler every call is recorded."""

    def __init__(self, layer: LayerRef, step_percent: float = 0.5):
        if not 0.0 <= float(step_percent) <= 1.0:
            raise DreamCacheError(f"step_percent {step_percent} must be between 0 and 1.")
        self.layer, self.step_percent = layer, float(step_percent)
        self.records: dict[int, Record] = {}
        self.step: int | None = None
        self.steps: int | None = None
        self.sigma: float | None = None
        self._run = None
        self._state = "idle"  # idle -> waiting -> recording -> done (per sampling run)
        self._target = None

    def __deepcopy__(self, memo):
        return self

    @property
    def layer_name(self) -> str:
        return layer_name(self.layer)

    def _start(self, schedule):
        self.records, self._run, self.sigma = {}, schedule, None
        self._state = "waiting"
        if schedule is None:
            self.step = self.steps = self._target = None
            return
        self.steps = max(int(schedule.numel()) - 1, 1)
        self.step = int(round(self.step_percent * (self.steps - 1)))
        self._target = float(schedule[min(self.step, schedule.numel() - 1)])

    def _wants(self, to: dict) -> bool:
        h = HookData(to)
        schedule, sigma = h.sample_sigmas, h.sigma
        if schedule is None or sigma is None:  # a direct call, not a sampler's: record it
            self._start(None)
            self._state, self.sigma = "recording", sigma
            return True
        if self._state == "recording":
            if sigma == self.sigma:
                return True
            self._state = "done"
        if self._state == "waiting" and sigma <= self._target * (1 + 1e-4) + 1e-9:
            self._state, self.sigma = "recording", sigma
            return True
        return False

    def plan(self, to, coc, switch, rows, batch, layers):
        """Per model call: (hook key, computed rows of the positive prompt, rows per chunk) to record, or None."""
        schedule = HookData(to).sample_sigmas
        if schedule is not None and schedule is not self._run:  # a new sampling run: forget the last one
            self._start(schedule)
        key = self.layer.hook_key
        if key not in layers:
            return None
        per = batch // len(coc) if coc else batch
        if rows is None:
            computed = range(batch)
        elif isinstance(rows, slice):
            computed = range(rows.start, rows.stop)
        else:
            computed = rows.tolist()
        pos = [j for j, r in enumerate(computed) if (coc[r // per] if coc else 0) == 0]
        if not pos or not self._wants(to):
            return None
        return key, torch.tensor(pos, dtype=torch.long), per

    @torch.no_grad()
    def observe(self, patch, works, xs, record, heads, extra):
        idx, per = record
        idx = idx.to(xs.device)
        x = xs.index_select(0, idx)
        h = HookData(extra)
        latent = h.latent_size
        grid = token_grid(x.shape[1], h.activations_shape, h.original_shape)
        for w in works:
            if w.ref != self.layer:
                continue
            q = w.layer.attn_mem.to_q(w.layer.norm2_mem(x))
            k = w.k if w.k.shape[0] == 1 else w.k.index_select(0, idx)
            p = head_mean_probs(q, k, heads)  # (R, N, M)
            check_recording(x, p, self.layer_name)  # one host read, at the recorded step only
            p = p.reshape(-1, per, *p.shape[1:]).sum(0).cpu()  # chunks of the positive prompt (regional prompts)
            chunks = idx.numel() // per
            e = patch.entries[w.entry]
            rec = self.records.get(w.entry)
            if rec is None:
                self.records[w.entry] = Record(
                    p,
                    chunks,
                    grid,
                    latent,
                    tuple(e.cache.spatial[w.ref]),
                    1 if e.cache.per_image else e.cache.references,
                    e.cache.per_image,
                    e.name,
                )
            else:
                rec.probs_sum += p
                rec.count += chunks

    def get(self, subject: int) -> Record:
        """The record of subject ``subject`` (1 = the first Apply DreamCache of the chain)."""
        if not self.records:
            raise DreamCacheError(
                "The attention recorder recorded nothing: connect its MODEL output to the sampler (the recording "
                "happens "
                "while sampling), and its LATENT output to this node; the positive prompt must run with the subject on."
            )
        keys = sorted(self.records)
        if not 1 <= subject <= len(keys):
            raise DreamCacheError(
                f"Subject {subject} was not recorded; this recording has {len(keys)} subject(s) at layer "
                f"{self.layer_name}."
            )
        return self.records[keys[subject - 1]]


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ/√d) averaged over heads, in fp32: q (B, N, C), k (B or 1, M, C) -> (B, N, M)."""
    b, n, c = q.shape
    d = c // heads
    qh = q.float().reshape(b, n, heads, d)
    kh = k.float().expand(b, -1, -1).reshape(b, k.shape[1], heads, d)
    out = torch.zeros(b, n, k.shape[1], dtype=torch.float32, device=q.device)
    for h in range(heads):  # one head at a time: memory (B, N, M), not (B, heads, N, M)
        out += torch.softmax(qh[:, :, h] @ kh[:, :, h].transpose(1, 2) * d**-0.5, dim=-1)
    return out / heads


# ---- the maps -----------------------------------------------------------------------------------------------------


def reference_subject(
    ref_grid: tuple[int, int],
    references: int,
    mask: torch.Tensor | None = None,
    image: torch.Tensor | None = None,
    white: float = 0.05,
) -> torch.Tensor:
    """Subject weight of each cached token, (references·h·w,) in [0, 1]: the reference's subject mask, else the
    pixels that are not white (the training layout puts the subject on white), area-averaged to the token grid."""
    if mask is None:
        if image is None:
            raise DreamCacheError("Give the reference image or its subject mask.")
        mask = ((1.0 - image[..., :3].float()).amax(-1) > white).float()
    m = mask.float()
    if m.dim() == 2:
        m = m[None]
    if m.shape[0] not in (1, references):
        raise DreamCacheError(
            f"The reference mask has a batch of {m.shape[0]} but the cache holds {references} references."
        )
    m = m.expand(references, -1, -1) if m.shape[0] == 1 else m
    pooled = F.adaptive_avg_pool2d(m[:, None], ref_grid)[:, 0]
    return pooled.reshape(-1).clamp(0.0, 1.0)


def subject_map(rec: Record, subject: torch.Tensor) -> torch.Tensor:
    """(B, h, w): per generated location, the share of its attention on the subject's tokens."""
    p = rec.probs
    if p.shape[-1] != subject.numel():
        raise DreamCacheError(
            f"The recorded attention has {p.shape[-1]} reference tokens but the reference gives {subject.numel()}."
        )
    return (p @ subject.to(p)).reshape(p.shape[0], *rec.grid)


def point_map(rec: Record, point_x: float, point_y: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, references, h_ref, w_ref): where the generated location at (point_x, point_y) (fractions of the width
    and height) looks in the reference; and the (row, column) of its token."""
    h, w = rec.grid
    row, col = min(int(point_y * h), h - 1), min(int(point_x * w), w - 1)
    p = rec.probs[:, row * w + col]  # (B, M)
    rh, rw = rec.ref_grid
    return p.reshape(p.shape[0], rec.references, rh, rw), (row, col)


# ---- drawing ------------------------------------------------------------------------------------------------------

_STOPS = torch.tensor(
    [[0.0, 0.0, 0.3], [0.0, 0.3, 1.0], [0.0, 0.9, 0.9], [0.9, 0.9, 0.0], [1.0, 0.3, 0.0], [1.0, 0.0, 0.0]]
)


def colormap(v: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1], any shape -> RGB (..., 3): dark blue (0) over cyan and yellow to red (1)."""
    v = v.clamp(0, 1) * (len(_STOPS) - 1)
    i = v.floor().long().clamp(max=len(_STOPS) - 2)
    t = (v - i)[..., None]
    return _STOPS[i] * (1 - t) + _STOPS[i + 1] * t


def overlay(images: torch.Tensor, heat: torch.Tensor, opacity: float = 0.5) -> torch.Tensor:
    """IMAGE (B, H, W, 3) blended with a heat map (B, h, w) scaled to [0, 1] by its own maximum, upsampled."""
    hm = heat.float()
    hm = hm / hm.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    up = F.interpolate(hm[:, None], size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    return images[..., :3].float().cpu() * (1 - opacity) + colormap(up.cpu()) * opacity


def mark_point(images: torch.Tensor, point_x: float, point_y: float) -> torch.Tensor:
    """A white cross with a black outline at the point (fractions of width and height)."""
    out = images.clone()
    _b, hh, ww, _c = out.shape
    cy, cx = min(int(point_y * hh), hh - 1), min(int(point_x * ww), ww - 1)
    r, t = max(3, min(hh, ww) // 40), max(1, min(hh, ww) // 256)
    for colour, extra in ((0.0, t), (1.0, 0)):
        y0, y1 = max(cy - r - extra, 0), min(cy + r + extra + 1, hh)
        x0, x1 = max(cx - r - extra, 0), min(cx + r + extra + 1, ww)
        out[:, max(cy - t - extra, 0) : cy + t + extra + 1, x0:x1] = colour
        out[:, y0:y1, max(cx - t - extra, 0) : cx + t + extra + 1] = colour
    return out
