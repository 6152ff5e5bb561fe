"""Draws the example images shipped with the workflows, made by the project (no downloaded image):

* workflows/dreamcache_example_subject.png: a red mug with a star, on white (the basic workflow opens with it);
* workflows/dreamcache_example_subject2.png: a blue teapot, on white (the second subject of the two-subject workflow);
* workflows/dreamcache_example_depth.png: a depth map (near = bright) of a mug on a table, the ControlNet example's
  hint;
* workflows/dreamcache_example_kitchen.png: a kitchen table by a window, the photo the inpainting, img2img and
  outpainting workflows put the subject into, and workflows/dreamcache_example_kitchen_mask.png: where on it the
  subject goes (white), as an artist would paint it.

    python tools/make_example_subject.py
"""
import math
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

S = 512


def mug(size=S):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, top, bottom, half = 236, 150, 400, 110
    body = (np.abs(xx - cx) <= half) & (yy >= top) & (yy <= bottom)
    # cylinder shading: light from the upper left
    t = np.clip((xx - (cx - half)) / (2 * half), 0, 1)
    shade = 0.55 + 0.45 * np.cos((t - 0.3) * math.pi)
    base = np.array([200, 38, 42], np.float32)
    rgb = np.array(img, np.float32)
    rgb[body] = (base[None] * shade[body][:, None]).clip(0, 255)
    img = Image.fromarray(rgb.astype(np.uint8))
    d = ImageDraw.Draw(img)
    # rim and inside
    d.ellipse([cx - half, top - 26, cx + half, top + 26], fill=(150, 24, 28))
    d.ellipse([cx - half + 12, top - 18, cx + half - 12, top + 18], fill=(70, 14, 16))
    # bottom curve
    d.chord([cx - half, bottom - 24, cx + half, bottom + 24], 0, 180, fill=(160, 30, 34))
    # handle
    d.arc([cx + half - 62, 205, cx + half + 62, 345], -90, 90, fill=(175, 32, 36), width=26)
    # a white star decal
    r1, r2, sx, sy = 46, 19, cx - 10, 275
    pts = [(sx + (r1 if i % 2 == 0 else r2) * math.sin(i * math.pi / 5),
            sy - (r1 if i % 2 == 0 else r2) * math.cos(i * math.pi / 5)) for i in range(10)]
    d.polygon(pts, fill=(250, 244, 230))
    # soft highlight
    hl = Image.new("L", (size, size), 0)
    ImageDraw.Draw(hl).rounded_rectangle([cx - half + 22, top + 40, cx - half + 42, bottom - 40], radius=10, fill=120)
    hl = hl.filter(ImageFilter.GaussianBlur(8))
    img = Image.composite(Image.new("RGB", (size, size), (255, 235, 235)), img, hl)
    return img


def teapot(size=S):
    """A round blue teapot with a spout, a handle and a lid, shaded from the upper left."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    cx, cy, r = 250, 300, 130
    d.polygon(
        [(cx - 100, cy - 10), (cx - 215, cy - 95), (cx - 200, cy - 110), (cx - 80, cy - 50)], fill=(30, 70, 150)
    )  # spout
    d.arc([cx + 60, cy - 90, cx + 190, cy + 70], -130, 130, fill=(30, 70, 150), width=26)  # handle
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    body = (xx - cx) ** 2 + ((yy - cy) * 1.15) ** 2 <= r * r
    light = np.clip(1 - np.hypot(xx - (cx - 50), yy - (cy - 60)) / (1.9 * r), 0, 1)
    rgb = np.array(img, np.float32)
    base = np.array([40, 90, 190], np.float32)
    rgb[body] = (base[None] * (0.45 + 0.75 * light[body][:, None])).clip(0, 255)
    img = Image.fromarray(rgb.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([cx - 70, cy - 140, cx + 70, cy - 95], fill=(35, 80, 170))  # lid
    d.ellipse([cx - 14, cy - 170, cx + 14, cy - 135], fill=(230, 200, 90))  # knob
    d.rectangle([cx - 120, cy + 5, cx + 120, cy + 25], fill=(240, 240, 245))  # a white band
    return img


def depth(size=S):
    """Near = bright: a table plane receding upwards and a mug-shaped cylinder standing on it, seen from the left."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    table = np.clip((yy - 0.35 * size) / (0.65 * size), 0, 1) * 150 + 40
    img = np.where(yy > 0.35 * size, table, 25.0)
    cx, half, top, bottom = 0.42 * size, 0.16 * size, 0.28 * size, 0.78 * size
    body = (np.abs(xx - cx) <= half) & (yy >= top) & (yy <= bottom)
    curv = np.sqrt(np.clip(1 - ((xx - cx) / half) ** 2, 0, 1))
    img = np.where(body, 170 + 70 * curv, img)
    handle = (np.abs(np.hypot(xx - (cx + half), yy - 0.52 * size) - 0.085 * size) < 0.022 * size) & (xx > cx + half)
    img = np.where(handle, 185.0, img)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(2)).convert("RGB")


def kitchen(size=S):
    """A kitchen table by a window: a beige wall with a window (sky, a tree), a wooden table top in perspective with
    grain, a potted plant on the right; the left half of the table is left free for the subject."""
    rng = np.random.default_rng(24)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    horizon = 0.58 * size
    wall = np.stack([236 - 30 * yy / size, 222 - 34 * yy / size, 196 - 40 * yy / size], -1)
    rgb = wall.copy()
    # window: sky gradient, a tree crown, a white frame with a cross bar
    wx0, wx1, wy0, wy1 = 0.52 * size, 0.9 * size, 0.08 * size, 0.46 * size
    win = (xx >= wx0) & (xx < wx1) & (yy >= wy0) & (yy < wy1)
    sky = np.stack([150 + 60 * (yy - wy0) / (wy1 - wy0), 190 + 40 * (yy - wy0) / (wy1 - wy0), 235 + 0 * yy], -1)
    rgb[win] = sky[win]
    crown = (np.hypot(xx - 0.8 * size, (yy - 0.36 * size) * 1.3) < 0.12 * size) & win
    rgb[crown] = np.array([70, 120, 60]) + rng.normal(0, 10, (int(crown.sum()), 3))
    # table: planks converging towards the horizon, grain, darker towards the front edge
    table = yy >= horizon
    depth = np.clip((yy - horizon) / (size - horizon), 0, 1)
    u = (xx - size / 2) / (0.6 + 0.8 * depth)
    grain = np.sin(u * 0.09 + 3 * np.sin(u * 0.013)) * 8 + np.sin(u * 0.5) * 3
    plank = (np.mod(u + size, 96) < 3).astype(np.float32) * 35
    wood = np.stack([150 + grain - plank - 25 * depth, 100 + grain * 0.8 - plank - 20 * depth,
                     60 + grain * 0.5 - plank - 12 * depth], -1)
    rgb[table] = wood[table]
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle([wx0 - 8, wy0 - 8, wx1 + 8, wy1 + 8], outline=(248, 246, 240), width=10)
    d.line([(wx0 + wx1) / 2, wy0, (wx0 + wx1) / 2, wy1], fill=(248, 246, 240), width=8)
    d.line([wx0, (wy0 + wy1) / 2, wx1, (wy0 + wy1) / 2], fill=(248, 246, 240), width=8)
    d.rectangle([0, horizon - 6, size, horizon + 2], fill=(110, 70, 40))  # the table's back edge
    # a terracotta pot with a plant on the right
    px, py = 0.78 * size, 0.8 * size
    d.polygon([(px - 48, py - 70), (px + 48, py - 70), (px + 34, py + 20), (px - 34, py + 20)], fill=(180, 90, 55))
    d.rectangle([px - 54, py - 82, px + 54, py - 66], fill=(165, 80, 48))
    for i in range(26):  # leaves on stems fanning out of the pot
        a = -math.pi / 2 + rng.uniform(-1.1, 1.1)
        r = rng.uniform(40, 120)
        lx, ly = px + r * math.cos(a), py - 78 + r * math.sin(a)
        d.line([px, py - 76, lx, ly], fill=(60, 105, 45), width=3)
        d.ellipse([lx - 20, ly - 11, lx + 20, ly + 11], fill=(int(rng.uniform(45, 80)), int(rng.uniform(115, 160)), 55))
    # the pot's shadow on the table
    sh = Image.new("L", (size, size), 0)
    ImageDraw.Draw(sh).ellipse([px - 70, py + 8, px + 60, py + 34], fill=90)
    sh = sh.filter(ImageFilter.GaussianBlur(6))
    img = Image.composite(Image.new("RGB", (size, size), (60, 40, 25)), img, sh)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def kitchen_mask(size=S):
    """White where the subject goes: a soft-edged blob on the free left half of the kitchen table, standing on it."""
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rounded_rectangle([0.16 * size, 0.36 * size, 0.5 * size, 0.86 * size], radius=0.08 * size,
                                        fill=255)
    return m


if __name__ == "__main__":
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "workflows"
    for name, img in (("dreamcache_example_subject.png", mug()), ("dreamcache_example_subject2.png", teapot()),
                      ("dreamcache_example_depth.png", depth()), ("dreamcache_example_kitchen.png", kitchen()),
                      ("dreamcache_example_kitchen_mask.png", kitchen_mask())):
        img.save(f"{out_dir}/{name}", optimize=True)
        print("wrote", f"{out_dir}/{name}")
