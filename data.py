"""Data for MADTP: synthetic scenes with a pruning ground truth, and COCO captions.

The data side of Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for
Accelerating Vision-Language Transformer", CVPR 2024, arXiv 2403.02991 (official code:
github.com/double125/MADTP). The synthetic scenes are the default data; they also say which patches
show an object and which words carry content, a ground truth for pruning no real data set has
(experiments/truth.py measures against it). COCO: the official and the Karpathy caption files,
subsets, a resumable downloader. Text follows BLIP's pre_caption, with a word-level tokenizer
instead of BERT's WordPiece so that nothing has to be downloaded. Every data set ends up as a
RetrievalSplit: captions, the image of each, image ids (captions of one id are positives for each
other) and uint8 pixels decoded once, up front.

    python data.py download-coco --root DIR --split val2017 --num-images 5000
"""
import argparse
import http.client
import json
import math
import os
import random
import re
import sys
import urllib.request
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

# Text.
PAD, CLS, UNK = 0, 1, 2
SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[UNK]"]
BLIP_PUNCTUATION = r"([.!\"()*#:;~])"   # the characters BLIP's pre_caption turns into spaces

# Images.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)   # BLIP's normalisation (CLIP's statistics)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_CROP_SCALE = (0.5, 1.0)   # BLIP's RandomResizedCrop; no flips: they swap "left" and "right"
STORE_MARGIN = 8 / 7            # COCO pixels are kept this much larger (224 -> 256): room for crops

# Synthetic scenes: objects on a GRID x GRID grid, at most one per cell.
GRID = 3
MAX_OBJECTS = 3   # objects per scene, 1 to this many; up to GRID * GRID
COLOURS = {       # saturated or bright, so that no colour hides in the grey background
    "red": (210, 45, 45), "green": (50, 170, 70), "blue": (50, 90, 215), "yellow": (225, 205, 50),
    "purple": (140, 70, 185), "orange": (235, 135, 35), "white": (235, 235, 235)}
SIZES = {"small": 0.26, "large": 0.42}   # radius r as a fraction of a grid cell
SHAPE_TESTS = {   # is offset (dx, dy) from the centre inside the shape of radius r; similar areas
    "circle": lambda dx, dy, r: dx**2 + dy**2 <= r**2,
    "square": lambda dx, dy, r: torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r,
    "triangle": lambda dx, dy, r: (dy <= r) & (2 * dx.abs() <= dy + r),   # apex at -r, base at +r
    "diamond": lambda dx, dy, r: dx.abs() + dy.abs() <= 1.15 * r,
    "cross": lambda dx, dy, r: ((torch.minimum(dx.abs(), dy.abs()) <= r / 3)
                                & (torch.maximum(dx.abs(), dy.abs()) <= r))}
SHAPES = tuple(SHAPE_TESTS)
SHAPE_EXTENT = 1.15   # the farthest any shape reaches from its centre, in units of r (the diamond)
POSITIONS = (         # per grid cell, row-major: (filler words, content words)
    ("at the", "top left"), ("at the", "top"), ("at the", "top right"),
    ("on the", "left"), ("in the", "middle"), ("on the", "right"),
    ("at the", "bottom left"), ("at the", "bottom"), ("at the", "bottom right"))
PREFIXES = ("", "there is", "a picture of", "an image showing", "we can see", "this scene has")
OBJECT_TEMPLATES = ("a {size} {colour} {shape} {position}",
                    "a {colour} {shape} {position} which is {size}",
                    "a {size} {shape} in {colour} {position}",
                    "a {size} {colour} {shape} placed {position}")
CONNECTORS = ("and", "and also", "next to", "with", "plus")
BACKGROUND_GREY = (90, 150)   # per-image base grey level, 0..255
BACKGROUND_TINT = 15          # per-channel colour cast of the background, +-
STRIPE_AMPLITUDE = 12         # low-contrast stripes: texture the pruner has to learn to ignore
STRIPE_PERIOD = (4, 12)       # pixels
NOISE_STD = 6                 # pixel noise over everything, objects included
OBJECT_PATCH_COVERAGE = 0.25  # a patch "shows an object" when objects cover this share of it
RENDER_CHUNK = 256            # images rasterised at once: bounds the (chunk, objects, S, S) masks
MAX_TRIES = 1000              # attempts at a new distinct scene or caption before giving up

# COCO.
MAX_BAD_FRACTION = 0.05   # missing or unreadable images are skipped and counted, up to this share
COCO_BASE_URL = "http://images.cocodataset.org"
ANNOTATIONS_ZIP = "annotations/annotations_trainval2017.zip"   # relative to the base URL
DOWNLOAD_THREADS, DOWNLOAD_TIMEOUT_S, DOWNLOAD_CHUNK_BYTES = 8, 60, 1 << 16


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Text: BLIP's caption cleaning and a word-level tokenizer

def _clean(caption):
    return re.sub(r"\s+", " ", re.sub(BLIP_PUNCTUATION, " ", caption.lower())).strip()


def pre_caption(caption, max_words):
    """BLIP's pre_caption, as words: lower-case, punctuation to spaces, truncated to max_words."""
    words = _clean(caption).split()
    if not words:
        raise ValueError(f"caption {caption!r} is empty after cleaning (BLIP removes .!\"()*#:;~); "
                         "fix or remove it")
    return words[:max_words]


class Tokenizer:
    """Word-level: one id per word of the training captions, [UNK] for the rest, [CLS] first."""

    def __init__(self, vocab, max_len):
        if list(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with {SPECIAL_TOKENS} (PAD, CLS, UNK), got "
                             f"{list(vocab[:3])}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate words; build it with Tokenizer.build")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for a word after [CLS]; use "
                             "max_len >= 2")
        self.vocab, self.max_len = list(vocab), int(max_len)
        self.index = {word: i for i, word in enumerate(self.vocab)}

    @classmethod
    def build(cls, captions, max_len, min_count=1):
        counts = Counter(word for caption in captions for word in pre_caption(caption, max_len - 1))
        words = sorted(w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS)
        return cls(SPECIAL_TOKENS + words, max_len)

    def words(self, caption):
        return pre_caption(caption, self.max_len - 1)

    def encode(self, captions, pad_to=None):
        """ids (B, N) with ids[:, 0] == CLS, and valid (B, N), False on padding."""
        if isinstance(captions, str) or not captions:
            raise ValueError("encode takes a non-empty list of captions (wrap a single caption in "
                             "a list)")
        words = [self.words(c) for c in captions]
        needed = 1 + max(len(w) for w in words)
        length = needed if pad_to is None else pad_to
        if not needed <= length <= self.max_len:
            raise ValueError(f"pad_to={pad_to} must lie between {needed} (the longest caption + "
                             f"[CLS]) and max_len={self.max_len}")
        ids = torch.full((len(captions), length), PAD, dtype=torch.long)
        ids[:, 0] = CLS
        for b, w in enumerate(words):
            ids[b, 1: 1 + len(w)] = torch.tensor([self.index.get(word, UNK) for word in w])
        return ids, ids != PAD

    def state_dict(self):
        return {"vocab": list(self.vocab), "max_len": self.max_len}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["vocab"], state["max_len"])

    def __len__(self):
        return len(self.vocab)


# ----------------------------------------------------------------------------------------------
# One split of an image-text retrieval data set, and the training batches

@dataclass
class RetrievalSplit:
    captions: list          # every caption of the split
    txt2img: list           # caption c describes image txt2img[c]
    image_ids: list         # per image; captions of the same id are positives for each other
    pixels: torch.Tensor    # (I, 3, H, W) uint8: H = W = image_size, or a bit larger with augment
    image_size: int
    augment: bool = False   # random-resized crops for training: COCO only (a crop moves objects)
    object_masks: torch.Tensor = None   # synthetic: (I, P) bool, which patches show an object
    content_flags: list = None          # synthetic: per caption, per word, does it carry content

    def __post_init__(self):
        if len(self.captions) != len(self.txt2img):
            raise ValueError(f"{len(self.captions)} captions but {len(self.txt2img)} txt2img "
                             "entries")
        if self.num_images == 0 or len(self.image_ids) != self.num_images:
            raise ValueError(f"a split needs >= 1 image and one id per image: {self.num_images} "
                             f"images, {len(self.image_ids)} ids")
        if sorted(set(self.txt2img)) != list(range(self.num_images)):
            raise ValueError("txt2img must point at existing images, and every image needs >= 1 "
                             "caption")

    @property
    def num_images(self):
        return self.pixels.shape[0]

    @cached_property
    def img2txt(self):
        captions_of = [[] for _ in range(self.num_images)]
        for c, i in enumerate(self.txt2img):
            captions_of[i].append(c)
        return captions_of

    def image(self, i, train=False):
        """Image i as the model sees it: (3, S, S) float, normalised."""
        x = self.pixels[i]
        if train and self.augment:
            x = v2.RandomResizedCrop(self.image_size, scale=TRAIN_CROP_SCALE, antialias=True)(x)
        elif x.shape[-1] != self.image_size:
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), IMAGE_MEAN, IMAGE_STD)

    def object_patches(self, i):
        """Which patches (row-major) of image i show an object; None for real data."""
        return None if self.object_masks is None else self.object_masks[i]

    def content_words(self, c):
        """Per word of pre_caption(captions[c]): does it carry content; None for real data."""
        return None if self.content_flags is None else self.content_flags[c]


class PairDataset(torch.utils.data.Dataset):
    """Training: one item per caption, with its (augmented) image and the image's id."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split.captions)

    def __getitem__(self, c):
        i = self.split.txt2img[c]
        return self.split.image(i, train=True), self.split.captions[c], self.split.image_ids[i]


class Collate:
    """A list of pairs -> one batch; captions become token ids here, in the loader's worker."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples):
        images, captions, image_ids = zip(*samples)
        ids, valid = self.tokenizer.encode(list(captions))
        return dict(images=torch.stack(images), ids=ids, valid=valid,
                    image_ids=torch.tensor(image_ids))


def train_batches(split, tokenizer, batch_size, seed, step=0, world=1, rank=0, num_workers=0,
                  pin_memory=False):
    """Endless training batches from `step` on, the same whether or not a run was interrupted:
    DistributedSampler shards and shuffles each epoch by (seed, epoch); resuming skips what's done."""
    dataset = PairDataset(split)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    epoch, skip = divmod(step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = list(sampler)
        batches = [idx[i * batch_size:(i + 1) * batch_size] for i in range(skip, per_epoch)]
        # its own generator: a DataLoader otherwise draws a seed from the global RNG, and a resumed
        # run, which builds its loader mid-epoch, would draw other hard negatives from then on
        yield from torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, collate_fn=Collate(tokenizer), num_workers=num_workers,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Synthetic scenes

def synthetic_max_words(max_objects=MAX_OBJECTS):
    """The longest caption the grammar makes: a Tokenizer of max_len 1 + this never truncates."""
    longest = lambda phrases: max(len(p.split()) for p in phrases)   # noqa: E731
    object_words = longest(OBJECT_TEMPLATES) - 1 + longest(f"{a} {b}" for a, b in POSITIONS)
    return longest(PREFIXES) + (max_objects - 1) * longest(CONNECTORS) + max_objects * object_words


@dataclass(frozen=True)
class SceneObject:
    cell: int                      # 0 .. GRID*GRID - 1, row-major
    colour: str
    shape: str
    size: str
    jitter: tuple                  # (x, y) in [-1, 1]: offset from the centre, times the room left


def _scene_key(scene):
    return tuple((o.cell, o.colour, o.shape, o.size) for o in scene)   # what a caption tells apart


def _sample_scene(rng, max_objects):
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(1, max_objects)))
    return tuple(SceneObject(cell, rng.choice(list(COLOURS)), rng.choice(SHAPES),
                             rng.choice(list(SIZES)), (rng.uniform(-1, 1), rng.uniform(-1, 1)))
                 for cell in cells)


def _describe(scene, rng):
    """A caption in a random template and object order, and per word whether it carries content."""
    words, content = [], []

    def add(text, is_content):
        words.extend(text.split())
        content.extend([is_content] * len(text.split()))
    add(rng.choice(PREFIXES), False)
    for n, obj in enumerate(rng.sample(scene, len(scene))):
        if n > 0:
            add(rng.choice(CONNECTORS), False)
        for part in rng.choice(OBJECT_TEMPLATES).split():
            if part == "{position}":
                filler, place = POSITIONS[obj.cell]
                add(filler, False)
                add(place, True)
            elif part.startswith("{"):
                add(getattr(obj, part[1:-1]), True)   # {size}, {colour}, {shape}
            else:
                add(part, False)
    words = ["an" if w == "a" and nxt.startswith(tuple("aeiou")) else w
             for w, nxt in zip(words, words[1:] + [""])]
    return " ".join(words), content


def _fresh(make, key, used, what):
    """make() until its key is not in used (then add it): keeps scenes and captions distinct."""
    for _ in range(MAX_TRIES):
        item = make()
        if key(item) not in used:
            used.add(key(item))
            return item
    raise ValueError(f"no new distinct {what} in {MAX_TRIES} tries: ask for fewer images or "
                     "captions per image")


def _object_masks(scenes, image_size):
    """Rasterise the objects: masks (n, K, S, S) bool and colours (n, K, 3), K the most objects."""
    cell, K = image_size / GRID, max(len(scene) for scene in scenes)
    absent = (0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0)   # shape -1 matches no shape: an empty mask
    rows = []
    for scene in scenes:
        for o in scene:
            r = SIZES[o.size] * cell
            room = cell / 2 - SHAPE_EXTENT * r   # the object stays in its cell: no overlaps
            row, col = divmod(o.cell, GRID)
            x, y = (col + 0.5) * cell + o.jitter[0] * room, (row + 0.5) * cell + o.jitter[1] * room
            rows.append((x, y, r, float(SHAPES.index(o.shape)), *COLOURS[o.colour]))
        rows.extend([absent] * (K - len(scene)))
    g = torch.tensor(rows)                     # (n * K, 7): centre x, y, radius, shape, r, g, b
    centre = torch.arange(image_size) + 0.5   # pixel centres
    masks = torch.zeros(len(rows), image_size, image_size, dtype=torch.bool)
    for s, inside in enumerate(SHAPE_TESTS.values()):
        of_shape = (g[:, 3] == s).nonzero().squeeze(1)
        dx = centre.view(1, 1, -1) - g[of_shape, 0, None, None]   # (m, 1, S)
        dy = centre.view(1, -1, 1) - g[of_shape, 1, None, None]   # (m, S, 1)
        masks[of_shape] = inside(dx, dy, g[of_shape, 2, None, None])
    return masks.view(len(scenes), K, image_size, image_size), g[:, 4:].view(len(scenes), K, 3)


def _background(n, image_size, gen):
    """(n, 3, S, S) float in 0..255: a tinted grey with low-contrast stripes at a random angle."""
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=gen)
    grey = uniform(*BACKGROUND_GREY, n, 1, 1, 1)
    tint = uniform(-BACKGROUND_TINT, BACKGROUND_TINT, n, 3, 1, 1)
    angle, period = uniform(0, math.pi, n, 1, 1, 1), uniform(*STRIPE_PERIOD, n, 1, 1, 1)
    phase = uniform(0, 2 * math.pi, n, 1, 1, 1)
    centre = torch.arange(image_size) + 0.5
    along = centre.view(1, 1, 1, -1) * angle.cos() + centre.view(1, 1, -1, 1) * angle.sin()
    return grey + tint + STRIPE_AMPLITUDE * torch.sin(2 * math.pi * along / period + phase)


def _patch_flags(masks, patch_size):
    """(n, K, S, S) object masks -> (n, P) bool: patches covered enough, plus each object's best
    patch (so that a small object on a patch corner is still visible to the ground truth)."""
    n, k, size, _ = masks.shape
    g = size // patch_size
    cover = masks.float().view(n, k, g, patch_size, g, patch_size).mean((3, 5)).flatten(2)
    best = (cover == cover.amax(-1, keepdim=True)) & (cover > 0)
    return (cover.sum(1) >= OBJECT_PATCH_COVERAGE) | best.any(1)   # no overlap: coverage adds up


def _render(scenes, image_size, patch_size, gen):
    """scenes -> pixels (n, 3, S, S) uint8 and object patches (n, P) bool, from the same masks."""
    pixels, patches = [], []
    for start in range(0, len(scenes), RENDER_CHUNK):
        chunk = scenes[start: start + RENDER_CHUNK]
        masks, colours = _object_masks(chunk, image_size)
        image = _background(len(chunk), image_size, gen)
        for k in range(masks.shape[1]):
            image = torch.where(masks[:, k, None], colours[:, k, :, None, None], image)
        image = image + NOISE_STD * torch.randn(image.shape, generator=gen)
        pixels.append(image.clamp(0, 255).round().to(torch.uint8))
        patches.append(_patch_flags(masks, patch_size))
    return torch.cat(pixels), torch.cat(patches)


def synthetic_splits(num_train, num_val, num_test, captions_per_image=2, image_size=64,
                     patch_size=8, seed=0, max_objects=MAX_OBJECTS):
    """Train/val/test splits of synthetic scenes of 1 to max_objects objects; no scene appears
    twice, no caption twice within a split."""
    if min(num_train, num_val, num_test, captions_per_image) < 1:
        raise ValueError("every split needs >= 1 image and every image >= 1 caption")
    if not 1 <= max_objects <= GRID * GRID:
        raise ValueError(f"max_objects={max_objects}: a scene holds 1 to {GRID * GRID} objects, "
                         "one per cell")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    used_scenes, splits = set(), {}
    # test first, each split from its own seed: the test set stays the same whatever num_train is
    for name, num in (("test", num_test), ("val", num_val), ("train", num_train)):
        split_seed = zlib.crc32(f"{seed}/{name}".encode())
        rng, gen = random.Random(split_seed), torch.Generator().manual_seed(split_seed)
        scenes = [_fresh(lambda: _sample_scene(rng, max_objects), _scene_key, used_scenes, "scene")
                  for _ in range(num)]
        used_captions, captions, flags, txt2img = set(), [], [], []
        for i, scene in enumerate(scenes):
            for _ in range(captions_per_image):
                caption, content = _fresh(lambda: _describe(scene, rng), lambda d: d[0],
                                          used_captions, "caption")
                captions.append(caption)
                flags.append(content)
                txt2img.append(i)
        pixels, object_masks = _render(scenes, image_size, patch_size, gen)
        splits[name] = RetrievalSplit(captions, txt2img, list(range(num)), pixels, image_size,
                                      object_masks=object_masks, content_flags=flags)
    return {name: splits[name] for name in ("train", "val", "test")}


# ----------------------------------------------------------------------------------------------
# COCO: two annotation formats, one record type

@dataclass
class CocoRecord:
    image: Path
    captions: list
    image_id: int


def _how_to_get(root):
    return (f"get COCO with: python data.py download-coco --root {root} --split val2017 "
            "--num-images 5000")


def _inside(root, name, source, allow_folders):
    """root / name, refusing any name that could lead out of root."""
    path = Path(str(name))
    folders = not allow_folders and len(path.parts) > 1
    if not str(name) or path.is_absolute() or ".." in path.parts or folders:
        raise ValueError(f"{source}: file name {name!r} escapes the image root {root}; refusing it "
                         f"(names must be relative{'' if allow_folders else ', without folders'} and "
                         "without '..')")
    return root / path


def _int_id(image_id, path):
    """Karpathy ids may be strings ("coco_125870") or absent (BLIP's test files): their trailing
    digits, else those of the file name (COCO_val2014_000000391895.jpg), for COCO the same id."""
    if isinstance(image_id, int):
        return image_id
    for text in (image_id, path.stem):
        digits = re.search(r"\d+$", str(text or ""))
        if digits:
            return int(digits[0])
    raise ValueError(f"cannot make an integer id from image_id {image_id!r} or file name "
                     f"{path.name!r}")


def _official_records(data, ann, root):
    """Official layout: root/annotations/captions_<split>.json describes root/<split>/'s images."""
    split = re.fullmatch(r"captions_(\w+)\.json", ann.name)
    image_dir = root / split[1] if split else root
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} (for {ann.name}) does not exist; "
                                f"{_how_to_get(root)}")
    captions = {}
    for a in data["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    unknown = captions.keys() - {im["id"] for im in data["images"]}
    if unknown:
        raise ValueError(f"{ann}: captions refer to {len(unknown)} image ids not in its 'images', "
                         f"e.g. {min(unknown)}")
    return [CocoRecord(_inside(image_dir, im["file_name"], ann, allow_folders=False),
                       captions.get(im["id"], []), int(im["id"])) for im in data["images"]]


def _karpathy_records(data, ann, root):
    by_image = {}   # image path -> record, in order (train files have one entry per caption)
    for entry in data:
        path = _inside(root, entry["image"], ann, allow_folders=True)
        image_id = _int_id(entry.get("image_id"), path)
        record = by_image.setdefault(path, CocoRecord(path, [], image_id))
        caption = entry["caption"]
        record.captions += [caption] if isinstance(caption, str) else list(caption)
    return list(by_image.values())


def load_coco(root, ann_file, warn=_warn):
    """Records of one annotation file, official or Karpathy format (detected). ann_file: as given
    if it exists, else relative to root. Images with no captions are skipped, and warn() says so."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO folder {root} does not exist; {_how_to_get(root)}")
    ann = Path(ann_file) if Path(ann_file).is_file() else root / ann_file
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} not found (also looked at {ann}); "
                                f"{_how_to_get(root)}")
    try:
        data = json.loads(ann.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann} is not valid JSON ({e})") from None
    karpathy = isinstance(data, list) and data and all(
        isinstance(e, dict) and {"image", "caption"} <= e.keys() for e in data)
    try:
        if isinstance(data, dict) and {"images", "annotations"} <= data.keys():
            records = _official_records(data, ann, root)
        elif karpathy:
            records = _karpathy_records(data, ann, root)
        else:
            raise ValueError(f"{ann} is in neither COCO captions format: expected the official "
                             "one (a dict with 'images' and 'annotations') or Karpathy's (a list of "
                             "{'image', 'caption'} entries)")
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ann}: an entry is malformed ({type(e).__name__}: {e})") from None
    kept = [r for r in records if r.captions]
    if len(kept) < len(records):
        warn(f"{ann}: skipped {len(records) - len(kept)} of {len(records)} images that have no "
             "captions")
    if not kept:
        raise ValueError(f"{ann} lists no image with a caption")
    for r in kept:
        for caption in r.captions:
            if not isinstance(caption, str) or not _clean(caption):
                raise ValueError(f"{ann}: image {r.image_id} has caption {caption!r}, empty after "
                                 "cleaning; fix or remove it")
    return kept


def find_annotations(root):
    """The annotation files under root: the official ones if any, else Karpathy's (never both)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO folder {root} does not exist; {_how_to_get(root)}")
    searches = (("annotations/captions_*.json",),
                ("*karpathy*.json", "karpathy/*.json", "annotations/*karpathy*.json"))
    for patterns in searches:
        found = sorted({p for pattern in patterns for p in root.glob(pattern)})
        if found:
            return found
    looked = ", ".join(str(root / p) for patterns in searches for p in patterns)
    raise FileNotFoundError(f"no annotation files under {root}: looked for {looked}; "
                            f"{_how_to_get(root)}")


def _subset(records, num_images, sample_seed):
    if num_images is None:
        return records
    if not 1 <= num_images <= len(records):
        raise ValueError(f"num_images={num_images} (--coco-num-images), but the annotation files "
                         f"list {len(records)} images")
    if sample_seed is None:
        return records[:num_images]   # the first N: the ones download-coco --num-images N fetched
    chosen = random.Random(sample_seed).sample(range(len(records)), num_images)
    return [records[i] for i in sorted(chosen)]


def _split_by_image(n, val_fraction, test_fraction, seed):
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must lie "
                         "in (0, 1), with a sum below 1")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test, n_val = max(1, round(test_fraction * n)), max(1, round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} images are too few to split into train, val and test; use more "
                         "images")
    return {"train": sorted(order[n_test + n_val:]), "val": sorted(order[n_test: n_test + n_val]),
            "test": sorted(order[:n_test])}


def _decode(path, size):
    """The image as 8-bit RGB resized to (3, size, size) uint8, or why it could not be read. Grey,
    palette, CMYK and alpha images become RGB in the decoder; 16-bit PNGs are scaled to 8 bits."""
    if not path.is_file():
        return "missing"
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if image.shape[0] != 3 or min(image.shape[1:]) < 1:
        return f"unreadable (decoded to shape {tuple(image.shape)})"
    image = TF.to_dtype(image, torch.uint8, scale=True)   # 16-bit PNGs -> uint8; uint8 as is
    return TF.resize(image, [size, size], antialias=True)


def coco_splits(root, ann_files, image_size, num_images=None, sample_seed=None, val_fraction=0.15,
                test_fraction=0.15, seed=0, warn=_warn):
    """Pool the records of ann_files (found under root when empty), take the first num_images (or a
    seeded sample), split them by image into train/val/test, and decode every image once, up front.
    Images that are missing or unreadable are skipped, and warn() says which."""
    root = Path(root)
    files = [ann_files] if isinstance(ann_files, (str, Path)) else list(ann_files)
    records, first_seen = [], {}
    for ann in files or find_annotations(root):
        for r in load_coco(root, ann, warn):
            if r.image_id in first_seen:
                raise ValueError(f"image id {r.image_id} appears twice ({first_seen[r.image_id]} "
                                 f"and {r.image}): pass each image's annotations once (not both the "
                                 "official and the Karpathy file)")
            first_seen[r.image_id] = r.image
            records.append(r)
    records = _subset(records, num_images, sample_seed)
    parts = _split_by_image(len(records), val_fraction, test_fraction, seed)   # before bad files
    store = round(image_size * STORE_MARGIN)
    with ThreadPoolExecutor(os.cpu_count()) as pool:   # torchvision decodes outside the GIL
        pixels = list(tqdm(pool.map(lambda r: _decode(r.image, store), records), total=len(records),
                           desc="decoding COCO images", unit="img"))
    bad = [f"{r.image} ({p})" for r, p in zip(records, pixels) if isinstance(p, str)]
    if bad:
        warn(f"skipped {len(bad)} of {len(records)} images, missing or unreadable, e.g. {bad[0]}")
    if len(bad) > MAX_BAD_FRACTION * len(records):
        raise ValueError(f"{len(bad)} of {len(records)} images are missing or unreadable (more "
                         f"than {MAX_BAD_FRACTION:.0%}), e.g. {bad[0]}. If you downloaded only part of "
                         "a split, use the first N images (--coco-num-images N; download-coco fetches "
                         "the first N); to repair, rerun download-coco.")
    splits = {}
    for name, indices in parts.items():
        good = [i for i in indices if not isinstance(pixels[i], str)]
        captions = [c for i in good for c in records[i].captions]
        txt2img = [k for k, i in enumerate(good) for _ in records[i].captions]
        splits[name] = RetrievalSplit(captions, txt2img, [records[i].image_id for i in good],
                                      torch.stack([pixels[i] for i in good]), image_size,
                                      augment=True)
    return splits


# ----------------------------------------------------------------------------------------------
# Downloader: resumable, verified, never writes outside its root

def _download(url, dest, progress=False):
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        with tqdm(total=total or None, unit="B", unit_scale=True, desc=dest.name,
                  disable=not progress) as bar:
            while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                bar.update(out.write(chunk))
    if total and dest.stat().st_size != total:
        raise OSError(f"{url}: got {dest.stat().st_size} of {total} bytes")


def _decodes(path):
    return path.is_file() and not isinstance(_decode(path, 1), str)


def _fetch_image(url, dest):
    """Download url to dest unless a decodable dest is there already; True if it downloaded."""
    if _decodes(dest):
        return False
    part = dest.with_name(dest.name + ".part")   # dest only ever appears complete and verified
    _download(url, part)
    if not _decodes(part):
        part.unlink()
        raise ValueError(f"{url} is not a decodable image")
    os.replace(part, dest)
    return True


def _fetch_annotations(root, split, base_url, ann):
    archive = root / Path(ANNOTATIONS_ZIP).name   # kept: it holds the captions of every split
    if not archive.is_file():
        part = archive.with_name(archive.name + ".part")
        _download(f"{base_url}/{ANNOTATIONS_ZIP}", part, progress=True)
        os.replace(part, archive)
    member = f"annotations/captions_{split}.json"
    try:
        with zipfile.ZipFile(archive) as z:
            if member not in z.namelist():
                raise ValueError(f"{archive} has no {member}; it has "
                                 f"{[n for n in z.namelist() if 'captions' in n]}")
            captions = z.read(member)   # only this member, written by us: the zip picks no path
    except zipfile.BadZipFile:
        archive.unlink()
        raise ValueError(f"{archive} was not a valid zip; removed it, run the same command "
                         "again") from None
    ann.parent.mkdir(parents=True, exist_ok=True)
    part = ann.with_name(ann.name + ".part")
    part.write_bytes(captions)
    os.replace(part, ann)


def download_coco(root, split="val2017", num_images=None, base_url=COCO_BASE_URL):
    """Fetch captions_<split>.json and the first num_images images of the split into root, as
    root/annotations/captions_<split>.json and root/<split>/<file_name> (what load_coco expects),
    from base_url/annotations/annotations_trainval2017.zip and base_url/<split>/<file_name> (for the
    default base, the images' coco_url). Resumes: decodable files already there are kept."""
    if not re.fullmatch(r"\w+", split):
        raise ValueError(f"split {split!r} must be a plain name such as val2017 or train2017")
    root, base_url = Path(root), base_url.rstrip("/")
    ann = root / "annotations" / f"captions_{split}.json"
    root.mkdir(parents=True, exist_ok=True)
    if not ann.is_file():
        _fetch_annotations(root, split, base_url, ann)
    images = json.loads(ann.read_text())["images"][:num_images]
    jobs = {f"{base_url}/{split}/{im['file_name']}":
            _inside(root / split, im["file_name"], ann, allow_folders=False) for im in images}
    (root / split).mkdir(parents=True, exist_ok=True)
    downloaded, failures = 0, []
    bar = tqdm(total=len(jobs), desc=f"COCO {split}")
    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool, bar:
        futures = {pool.submit(_fetch_image, url, dest): url for url, dest in jobs.items()}
        for future in as_completed(futures):
            try:
                downloaded += future.result()
            except (OSError, ValueError, http.client.HTTPException) as e:   # URLError is an OSError
                failures.append(f"{futures[future]}: {e}")
            bar.update()
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(jobs)} images failed, e.g. {failures[0]}; run "
                           "the same command again to fetch the rest")
    return {"downloaded": downloaded, "present": len(jobs) - downloaded}


def main(argv=None):
    parser = argparse.ArgumentParser(description="MADTP data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download-coco", help="COCO captions, the first N images of a split")
    download.add_argument("--root", type=Path, required=True, help="folder to download into")
    download.add_argument("--split", default="val2017", help="val2017 or train2017")
    download.add_argument("--num-images", type=int, help="the first N images of the split (all)")
    download.add_argument("--base-url", default=COCO_BASE_URL, help="has annotations/ and <split>/")
    args = parser.parse_args(argv)
    try:
        counts = download_coco(args.root, args.split, args.num_images, args.base_url)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.root}: {counts['downloaded']} images downloaded, {counts['present']} were there")


if __name__ == "__main__":
    main()
