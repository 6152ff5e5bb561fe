"""Training data for DreamCache adapters, one module per concern:

* :mod:`.layout`: the dataset layout on disk (``<root>/<object_id>/<n>_generation.png``, ``_caption.txt``,
  ``_mask.png``), reading images and masks, validation;
* :mod:`.seeds`: seeded randomness; :mod:`.augment`: the training augmentations (colour jitter included);
* :mod:`.dataset`: the dataset indexed by sample position, collate, the loader;
* :mod:`.masks`, :mod:`.captions`, :mod:`.writer`: what ``synth`` needs (maskers, caption lists, writing items);
* :mod:`.synth`: rendering a dataset with a checkpoint; :mod:`.sharding`: splitting that over processes;
* :mod:`.cli`: the ``python -m dreamcache.data`` command (``check``, ``synth``); these three are not imported here.

The reference of a sample is its own target, segmented and augmented (method.md, "Preprocessing"). Every random
decision of sample ``position`` (which object, which of its images, caption dropout, the augmentation) comes from
generators seeded by ``(seed, position)``, so a run is reproducible and can resume at any step without replaying the
data. Pure numpy / PIL / torch: no ComfyUI here (``synth`` imports it, lazily, in :mod:`.cli`).
"""
from .augment import (
                      AugmentConfig,
                      Jitter,
                      RefAugment,
                      TargetGeometry,
                      augment_reference,
                      crop_subject,
                      erase_box,
                      place_on_canvas,
                      prepare_target,
                      subject_on_white,
)
from .captions import caption_key, combine_captions, dedupe, object_id_for, read_lines
from .dataset import PositionSampler, SamplePlan, TrainingData, batches, collate
from .layout import (
                      CAPTION_SUFFIX,
                      IMAGE_SUFFIX,
                      MASK_SUFFIX,
                      MASK_THRESHOLD,
                      DatasetError,
                      DatasetIndex,
                      Item,
                      check_item,
                      item_done,
                      load_mask,
                      load_rgb,
                      scan_dataset,
                      validate_dataset,
)
from .masks import MASKERS, mask_problem, parse_box, sam_masker, white_background_mask, white_background_masker
from .seeds import derive_seed, rng_for, torch_generator
from .writer import SynthSettings, write_item

__all__ = [
    "AugmentConfig", "Jitter", "RefAugment", "TargetGeometry", "augment_reference", "crop_subject", "erase_box",
    "place_on_canvas", "prepare_target", "subject_on_white", "caption_key", "combine_captions", "dedupe",
    "object_id_for", "read_lines", "PositionSampler", "SamplePlan", "TrainingData", "batches", "collate",
    "CAPTION_SUFFIX", "IMAGE_SUFFIX", "MASK_SUFFIX", "MASK_THRESHOLD", "DatasetError", "DatasetIndex", "Item",
    "check_item", "item_done", "load_mask", "load_rgb", "scan_dataset", "validate_dataset", "MASKERS", "mask_problem",
    "parse_box", "sam_masker", "white_background_mask", "white_background_masker", "derive_seed", "rng_for",
    "torch_generator", "SynthSettings", "write_item",
]
