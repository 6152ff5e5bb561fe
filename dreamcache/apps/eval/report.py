"""Score files, the tables (Markdown and JSON, with the paper's Table 2 beside them) and the image grids."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .metrics import ALL_METRICS, LABELS, mean, std

#: DreamCache's Table 2 (DreamBench, one reference, DINO / CLIP-I / CLIP-T), CVPR 2025.
PAPER_TABLE2 = [
    {"method": "DreamCache SD1.5 (paper, Table 2)", "dino": 0.713, "clip_i": 0.810, "clip_t": 0.298},
    {"method": "DreamCache SD2.1 (paper, Table 2)", "dino": 0.767, "clip_i": 0.816, "clip_t": 0.301},
    {"method": "IP-Adapter SD1.5 (paper, Table 2)", "dino": 0.667, "clip_i": 0.813, "clip_t": 0.289},
]
FIELDS = ["method", "subject", "kind", "prompt_index", "prompt", "image_index", "seed", "file", *ALL_METRICS]
SCORES_DIR = "scores"


def _atomic_write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data):
    _atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def row_key(row: dict) -> tuple[str, str, int, int]:
    return (row["method"], row["subject"], int(row["prompt_index"]), int(row["image_index"]))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6f}"
    return "" if v is None else str(v)


def write_scores(path: Path, rows: list[dict]):
    """One CSV row per image, written atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=row_key):
            w.writerow({k: _fmt(r.get(k)) for k in FIELDS})
    os.replace(tmp, path)


def read_scores(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = []
        for r in csv.DictReader(f):
            for k in ALL_METRICS:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            r["prompt_index"], r["image_index"], r["seed"] = (
                int(r["prompt_index"]),
                int(r["image_index"]),
                int(r["seed"]),
            )
            rows.append(r)
        return rows


def score_files(out: Path) -> list[Path]:
    d = Path(out) / SCORES_DIR
    return sorted(d.glob("*.csv")) if d.is_dir() else []


def all_scores(out: Path) -> dict[tuple, dict]:
    """Every scored image of every shard in ``out`` (one row per image; shards never overlap)."""
    rows: dict[tuple, dict] = {}
    for f in score_files(out):
        for r in read_scores(f):
            rows.setdefault(row_key(r), r)
    return rows


# ---- tables --------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    """Mean (and sample std) of each metric over the images: the protocol's mean over generated/reference and
    generated/prompt pairs, one pair per image. A metric without any value (masked ones without masks) is None."""
    out = {"images": len(rows)}
    for k in ALL_METRICS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = mean(vals)
        out[f"{k}_std"] = std(vals)
        if k in ("dino_masked", "clip_i_masked"):
            out[f"{k}_images"] = len(vals)
    return out


def tables(rows: list[dict], methods: list[str], subjects: list[str]) -> dict:
    result = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        result[m] = {
            "overall": summarize(mine),
            "object": summarize([r for r in mine if r.get("kind") == "object"]),
            "live": summarize([r for r in mine if r.get("kind") == "live"]),
            "subjects": {s: summarize([r for r in mine if r["subject"] == s]) for s in subjects},
        }
    return result


def _cell(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown(report: dict) -> str:
    """The overall table (yours and the paper's rows), then one per-subject table per method."""
    shown = [k for k in ALL_METRICS if any(report["methods"][m]["overall"][k] is not None for m in report["methods"])]
    head = "| method | images | " + " | ".join(LABELS[k] for k in shown) + " |"
    rule = "|---|---:|" + "---:|" * len(shown)
    lines = ["# DreamBench evaluation", ""]
    p = report["protocol"]
    lines.append(
        f"{p['subjects']} subjects, {p['prompts_per_subject']} prompts each, {p['images_per_prompt']} images "
        f"per prompt; "
        f"reference image {p['reference'] or 'the first (00.jpg)'}; reference mask: "
        f"{report['settings'].get('mask_mode', '?')}."
    )
    s = report["settings"].get("sampling", {})
    if s:
        lines.append(
            f"Sampling: {s.get('sampler')} / {s.get('scheduler')}, {s.get('steps')} steps, s_T {s.get('text_scale')}, "
            f"s_I {s.get('image_scale')} ({s.get('mode')} guidance), strength {s.get('strength')}, "
            f"{report['settings'].get('resolution', '?')} px, checkpoint {report['settings'].get('checkpoint', '?')}."
        )
    c = report["completeness"]
    lines.append(
        f"Images scored: {c['found']} of {c['expected']}"
        + ("" if c["found"] == c["expected"] else " (INCOMPLETE: the means cover only the scored images)")
        + "."
    )
    if report.get("wall_time"):
        w = report["wall_time"]
        lines.append(
            f"Wall time: {w['seconds']:.0f} s over {w['runs']} run(s) ({w['generated']} images generated, "
            f"{w['seconds_per_generated_image']:.2f} s per generated image)."
            if w.get("seconds_per_generated_image")
            else f"Wall time: {w['seconds']:.0f} s over {w['runs']} run(s)."
        )
    lines += ["", "## Overall", "", head, rule]
    for m, t in report["methods"].items():
        o = t["overall"]
        lines.append(f"| {m} | {o['images']} | " + " | ".join(_cell(o[k]) for k in shown) + " |")
        for kind in ("object", "live"):
            if t[kind]["images"]:
                lines.append(
                    f"| {m}: {kind} subjects | {t[kind]['images']} | "
                    + " | ".join(_cell(t[kind][k]) for k in shown)
                    + " |"
                )
    for r in PAPER_TABLE2:
        lines.append(f"| {r['method']} | 3000 | " + " | ".join(_cell(r.get(k)) for k in shown) + " |")
    for m, t in report["methods"].items():
        lines += [
            "",
            f"## Per subject: {m}",
            "",
            "| subject | images | " + " | ".join(LABELS[k] for k in shown) + " |",
            "|---|---:|" + "---:|" * len(shown),
        ]
        for subj, o in t["subjects"].items():
            lines.append(f"| {subj} | {o['images']} | " + " | ".join(_cell(o[k]) for k in shown) + " |")
    return "\n".join(lines) + "\n"


# ---- grids ---------------------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        t = f"{cur} {w}".strip()
        if draw.textlength(t, font=font) <= width or not cur:
            cur = t
        else:
            lines.append(cur)
            cur = w
    return lines + ([cur] if cur else [])


def grid(reference, rows: list[tuple[str, list]], cell: int = 128, path: Path | None = None):
    """One picture per subject: the reference in the first column of every row, then that row's generations; the
    prompt is written under each row. ``rows``: ``(prompt, [image path or PIL image or None, ...])``."""
    from PIL import Image, ImageDraw

    def thumb(im):
        if im is None:
            return Image.new("RGB", (cell, cell), (200, 200, 200))
        if not isinstance(im, Image.Image):
            with Image.open(im) as f:
                im = f.convert("RGB")
        im = im.convert("RGB")
        im.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
        canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
        return canvas

    cols = 1 + max((len(r[1]) for r in rows), default=0)
    font = _font(max(10, cell // 10))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, prompt, font, cols * cell - 8) for prompt, _ in rows]
    line_h = int(font.size * 1.25) if hasattr(font, "size") else 12
    heights = [cell + 4 + line_h * max(1, len(w)) + 6 for w in wrapped]
    img = Image.new("RGB", (cols * cell, sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    ref = thumb(reference)
    y = 0
    for (prompt, images), lines, h in zip(rows, wrapped, heights):
        img.paste(ref, (0, y))
        for j, im in enumerate(images):
            img.paste(thumb(im), ((j + 1) * cell, y))
        for k, line in enumerate(lines):
            draw.text((4, y + cell + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
        y += h
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        img.save(tmp, format="JPEG", quality=90)
        os.replace(tmp, path)
    return img
