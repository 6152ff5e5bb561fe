"""The DreamBench protocol as data: subjects, prompts, seeds, the work list, shards (pure Python, no ComfyUI, no torch).

DreamBench (the DreamBooth dataset, google/dreambooth ``dataset/``): 30 subjects in folders ``<subject>/NN.jpg``
and ``prompts_and_classes.txt`` with each subject's class noun and the 25 object and 25 live-subject prompts.
The live subjects are the cats and dogs (9 of 30). DreamCache's protocol: one reference per subject, the 25
prompts of its kind with the class noun and no unique token ("a dog in the jungle"), 4 images per prompt:
30 x 25 x 4 = 3,000 images per method.

Seeds come from (subject, prompt, image index, base seed) through SHA-256, so they are the same in every run,
process and shard (Python's ``hash()`` is randomised per process and is not used).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import DreamCacheError

PROMPTS_FILE = "prompts_and_classes.txt"
#: class nouns of DreamBench's live subjects (cat, cat2, dog, dog2, dog3, dog5, dog6, dog7, dog8)
LIVE_CLASSES = frozenset({"cat", "dog"})
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_IMAGES_PER_PROMPT = 4
ENV_VAR = "DREAMBENCH_PATH"
_SEED_BITS = 53  # exact in a JSON double


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    live: bool
    images: tuple[Path, ...]

    @property
    def kind(self) -> str:
        return "live" if self.live else "object"


@dataclass(frozen=True)
class Item:
    """One image of the protocol for one method."""

    method: str
    subject: str
    prompt_index: int
    prompt: str
    image_index: int
    seed: int

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.method, self.subject, self.prompt_index, self.image_index)

    @property
    def file(self) -> str:
        """Path of the image relative to the output folder (always '/'-separated)."""
        return f"images/{self.method}/{self.subject}/p{self.prompt_index:02d}_{self.image_index}.png"


@dataclass
class Protocol:
    root: Path
    subjects: list[Subject]
    object_prompts: list[str]  # templates with {0} (unique token) and {1} (class noun)
    live_prompts: list[str]
    images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT
    seed: int = 0
    prompt_indices: list[int] | None = None  # None = all 25
    reference: str = ""  # file name stem or name of the reference image; "" = the first (00.jpg)
    extra: dict = field(default_factory=dict)

    def prompt_templates(self, subject: Subject) -> list[str]:
        return self.live_prompts if subject.live else self.object_prompts

    def prompts(self, subject: Subject) -> list[tuple[int, str]]:
        """``(index, prompt)`` pairs for the subject: its kind's list with the class noun and no unique token."""
        templates = self.prompt_templates(subject)
        idx = range(len(templates)) if self.prompt_indices is None else self.prompt_indices
        return [(i, fill_prompt(templates[i], subject.cls)) for i in idx]

    def subject(self, name: str) -> Subject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise DreamCacheError(
            f"DreamBench has no subject '{name}'; subjects are {', '.join(s.name for s in self.subjects)}."
        )

    def reference_image(self, subject: Subject) -> Path:
        return pick_reference(subject, self.reference)

    def items(self, methods: list[str]) -> list[Item]:
        """Every image of the protocol, in a fixed order: method, subject, prompt, image index."""
        out = []
        for m in methods:
            for s in self.subjects:
                for pi, prompt in self.prompts(s):
                    for k in range(self.images_per_prompt):
                        out.append(Item(m, s.name, pi, prompt, k, seed_for(s.name, prompt, k, self.seed)))
        return out


def fill_prompt(template: str, class_noun: str, unique_token: str = "") -> str:
    """``'a {0} {1} in the snow'`` -> ``'a dog in the snow'`` (no unique token: the space it had is dropped)."""
    text = template.replace("{0}", unique_token).replace("{1}", class_noun)
    return re.sub(r"\s+", " ", text).strip()


def seed_for(subject: str, prompt: str, index: int, base: int = 0) -> int:
    """A stable 53-bit seed for one image, from SHA-256 of (subject, prompt, index, base)."""
    digest = hashlib.sha256(
        f"dreambench\x1f{subject}\x1f{prompt}\x1f{int(index)}\x1f{int(base)}".encode("utf-8")
    ).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << _SEED_BITS) - 1)


# ---- the prompts file -----------------------------------------------------------------------------------------------

_QUOTED = re.compile(r"""^\s*(['"])(.*?)\1\s*\.format\(""")


def parse_prompts_file(path: str | os.PathLike) -> tuple[dict[str, str], list[str], list[str]]:
    """``(classes, object_prompts, live_prompts)`` from DreamBench's ``prompts_and_classes.txt``."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError:
        raise DreamCacheError(f"'{p}' cannot be read; pass the DreamBench folder that holds {PROMPTS_FILE}.") from None
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in lines:
        s = line.strip()
        low = s.lower()
        if low.startswith("subject_name"):
            section = "classes"
            continue
        if low.startswith("object prompts"):
            section = "object"
            continue
        if low.startswith("live subject prompts"):
            section = "live"
            continue
        if section == "classes":
            if not s:
                section = None
                continue
            name, _, cls = s.partition(",")
            if name and cls:
                classes[name.strip()] = cls.strip()
        elif section in lists:
            m = _QUOTED.match(s)
            if m:
                lists[section].append(m.group(2))
    if not classes or not lists["object"] or not lists["live"]:
        raise DreamCacheError(
            f"'{p}' is not DreamBench's {PROMPTS_FILE} (no subject classes or prompt lists found); "
            "use the file from the google/dreambooth repository's dataset/ folder."
        )
    return classes, lists["object"], lists["live"]


def find_dreambench(
    explicit: str | os.PathLike | None = None, repo_root: str | os.PathLike | None = None
) -> Path | None:
    """The DreamBench folder: ``explicit``, then ``$DREAMBENCH_PATH``, then ``../shared/dreambench`` and
    ``./shared/dreambench`` beside ``repo_root``."""
    candidates = [explicit, os.environ.get(ENV_VAR)]
    if repo_root is not None:
        r = Path(repo_root)
        candidates += [r.parent / "shared" / "dreambench", r / "shared" / "dreambench"]
    for c in candidates:
        if c and (Path(c) / PROMPTS_FILE).is_file():
            return Path(c)
    return None


def subject_images(folder: Path) -> tuple[Path, ...]:
    return tuple(
        sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and "mask" not in f.stem
        )
    )


def pick_reference(subject: Subject, which: str = "") -> Path:
    """The reference photo: the first image (protocol default, ``00.jpg``), or the one named ``which``
    (a file name, a stem such as ``03``, or an index such as ``2``)."""
    if not subject.images:
        raise DreamCacheError(
            f"DreamBench subject '{subject.name}' has no images; put its photos in {subject.name}/ as 00.jpg, "
            f"01.jpg, ..."
        )
    if not which:
        return subject.images[0]
    for f in subject.images:
        if which in (f.name, f.stem):
            return f
    if which.isdigit() and int(which) < len(subject.images):
        return subject.images[int(which)]
    raise DreamCacheError(
        f"Subject '{subject.name}' has no reference image '{which}'; it has "
        f"{', '.join(f.name for f in subject.images)}."
    )


def load_protocol(
    root: str | os.PathLike,
    subjects: list[str] | None = None,
    prompts: list[int] | int | None = None,
    images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
    seed: int = 0,
    reference: str = "",
) -> Protocol:
    """The protocol on the DreamBench folder ``root``, optionally restricted to some subjects and prompts
    (``prompts``: a count (the first n) or a list of indices into the 25)."""
    root = Path(root)
    if not (root / PROMPTS_FILE).is_file():
        raise DreamCacheError(
            f"'{root}' is not a DreamBench folder (no {PROMPTS_FILE}); pass the google/dreambooth "
            f"repository's dataset/ folder."
        )
    classes, object_prompts, live_prompts = parse_prompts_file(root / PROMPTS_FILE)
    if images_per_prompt < 1:
        raise DreamCacheError(f"--images-per-prompt {images_per_prompt} must be at least 1.")
    all_subjects = []
    missing = []
    for name, cls in classes.items():
        folder = root / name
        if not folder.is_dir():
            missing.append(name)
            continue
        all_subjects.append(Subject(name, cls, cls in LIVE_CLASSES, subject_images(folder)))
    wanted = list(classes) if subjects is None else list(subjects)
    unknown = [s for s in wanted if s not in classes]
    if unknown:
        raise DreamCacheError(
            f"DreamBench has no subject {', '.join(repr(u) for u in unknown)}; subjects are {', '.join(classes)}."
        )
    absent = [s for s in wanted if s in missing]
    if absent:
        raise DreamCacheError(
            f"The DreamBench folder '{root}' lacks the subject folder(s) {', '.join(absent)}; copy the full "
            f"dataset/ folder."
        )
    by_name = {s.name: s for s in all_subjects}
    chosen = [by_name[s] for s in wanted]
    n = min(len(object_prompts), len(live_prompts))
    if prompts is None:
        indices = None
    elif isinstance(prompts, int):
        if not 1 <= prompts <= n:
            raise DreamCacheError(f"--prompts {prompts} must be between 1 and {n}.")
        indices = list(range(prompts))
    else:
        indices = sorted(set(int(i) for i in prompts))
        if not indices or indices[0] < 0 or indices[-1] >= n:
            raise DreamCacheError(f"Prompt indices {prompts} must lie in 0..{n - 1}.")
    proto = Protocol(root, chosen, object_prompts, live_prompts, images_per_prompt, seed, indices, reference)
    for s in chosen:
        proto.reference_image(s)  # fail now, not after an hour of generation
    return proto


# ---- shards ------------------------------------------------------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)`` (1-based); None -> ``(1, 1)``."""
    if not text:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise DreamCacheError(f"--shard {text!r} is not understood; write I/N with 1 <= I <= N, e.g. --shard 2/4.")
    return int(m.group(1)), int(m.group(2))


def group_key(item: Item) -> tuple[str, str, int]:
    """The unit shards are made of: all images of one prompt of one subject of one method (they share a prompt
    encoding and can share a sampler batch)."""
    return (item.method, item.subject, item.prompt_index)


def shard_items(items: list[Item], shard: tuple[int, int]) -> list[Item]:
    """The items of shard ``I/N``: groups (one prompt of one subject of one method) dealt round-robin in protocol
    order, so the shards are disjoint, their union is the whole list, and they differ in size by at most one group."""
    i, n = shard
    order: dict[tuple, int] = {}
    for it in items:
        order.setdefault(group_key(it), len(order))
    return [it for it in items if order[group_key(it)] % n == i - 1]


def shard_name(shard: tuple[int, int]) -> str:
    return "all" if shard[1] == 1 else f"shard-{shard[0]:03d}-of-{shard[1]:03d}"
