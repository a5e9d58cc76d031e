r"""Episodic few-shot dataset base class, episode samplers and the batch collation.

An episode is (class, query, K supports). Evaluation episodes are pre-sampled in the main process from a seed, so
they are identical for any number of workers and can be saved with the results; training episodes are drawn afresh
each epoch from (seed, epoch), so a resumed run sees exactly the episodes it would have seen.
"""
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from common.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from common.errors import UserError
from data.augment import PLAN_STREAM, episode_seed


@dataclass(frozen=True)
class Episode:
    class_id: int
    query: str
    supports: tuple[str, ...]
    #: Training episodes: the seed of their images' augmentation (data/augment.py); None: not augmented.
    seed: int | None = None

    def pairs(self) -> list[tuple[str, int]]:
        r"""The (image, class) pairs the episode loads: the query's, then the supports'."""
        return [(key, self.class_id) for key in (self.query, *self.supports)]

    def to_json(self, class_names: list[str]) -> dict:
        return {'class': class_names[self.class_id], 'class_id': self.class_id, 'query': self.query,
                'supports': list(self.supports)}


class EpisodicDataset(Dataset):
    r"""Base class of every benchmark.

    A subclass sets `name`, `domain` ('source' may be trained on; 'target' may only be tested), `splits`,
    `layout` (the expected folder tree, shown in errors), and implements
      * `build_index()` -> (class names, item keys per class) for `self.split`;
      * `read_image(key)` -> PIL RGB image;
      * `read_mask(key, class_id)` -> uint8 array at the image's size: 1 = class, 0 = other, 255 = ignore.
    Indexing the dataset with an `Episode` returns the episode dict (see `load_episode`).
    """

    name = ''
    domain = 'source'
    splits: tuple[str, ...] = ('test',)
    #: The benchmark's own options, name -> help: each is a command-line flag (--name, a string; None = the
    #: benchmark's default) of train.py/test.py, passed to the constructor when given (data/__init__.py). Literal
    #: dicts, so that the flags exist without importing the dataset.
    options: dict[str, str] = {}
    #: On/off options, name -> help (flags without a value).
    switches: dict[str, str] = {}
    layout = ''
    #: Evaluation episodes when test.py's --episodes is not given.
    default_episodes = 600

    def __init__(self, datapath: str | Path, split: str = 'test', nshot: int = 1, img_size: int = 400):
        if split not in self.splits:
            raise UserError(f'benchmark {self.name!r} has no {split!r} split (available: {", ".join(self.splits)})')
        if nshot < 1:
            raise UserError(f'--nshot must be >= 1 (got {nshot})')
        self.datapath = Path(datapath)
        self.split = split
        self.nshot = nshot
        self.img_size = img_size
        self.class_names, self.class_items = self.build_index()
        self.class_items = [sorted(set(items)) for items in self.class_items]
        if len(self.class_names) != len(self.class_items):
            raise RuntimeError(f'{type(self).__name__}.build_index returned mismatching lists')
        self.usable_classes = [c for c, items in enumerate(self.class_items) if len(items) >= 2]
        unusable = [self.class_names[c] for c, items in enumerate(self.class_items) if 0 < len(items) < 2]
        if unusable:
            warnings.warn(f'{self.name}/{split}: classes with a single image cannot form an episode and are skipped: '
                          f'{", ".join(unusable)}', stacklevel=2)
        if not self.usable_classes:
            raise UserError(f'{self.name}/{split} under {self.datapath} has no class with at least 2 images; '
                            f'expected layout:\n{self.layout}')

    # --- subclass API -------------------------------------------------------------------------------------------
    def build_index(self) -> tuple[list[str], list[list[str]]]:
        raise NotImplementedError

    def read_image(self, key: str) -> Image.Image:
        raise NotImplementedError

    def read_mask(self, key: str, class_id: int) -> np.ndarray:
        raise NotImplementedError

    # --- episodes -----------------------------------------------------------------------------------------------
    @property
    def pairs(self) -> list[tuple[str, int]]:
        r"""All (item, class) pairs of the usable classes: the training queries of one epoch."""
        return [(key, c) for c in self.usable_classes for key in self.class_items[c]]

    def sample_supports(self, rng: np.random.Generator, class_id: int, query: str) -> tuple[str, ...]:
        r"""K supports of the class, never the query; distinct when the class has more than K other images."""
        others = [key for key in self.class_items[class_id] if key != query]
        replace = len(others) < self.nshot
        picks = rng.choice(len(others), size=self.nshot, replace=replace)
        return tuple(others[i] for i in picks)

    def classes_short_of_shots(self) -> dict[str, int]:
        r"""Usable classes with K or fewer images: their K supports cannot be K distinct images other than the
        query, so supports repeat. {class name: number of images}."""
        return {self.class_names[c]: len(self.class_items[c]) for c in self.usable_classes
                if len(self.class_items[c]) <= self.nshot}

    def sample_episodes(self, n: int, seed: int) -> list['Episode']:
        r"""Class-balanced evaluation episodes: episode i takes class i % (number of usable classes)."""
        rng = np.random.default_rng(seed)
        episodes = []
        for i in range(n):
            c = self.usable_classes[i % len(self.usable_classes)]
            query = self.class_items[c][rng.integers(len(self.class_items[c]))]
            episodes.append(Episode(c, query, self.sample_supports(rng, c, query)))
        return episodes

    def sample_training_episodes(self, n: int, seed: int, epoch: int) -> list['Episode']:
        r"""Training episodes: queries drawn uniformly over all (image, class) pairs, fresh for every epoch; episode
        i carries the seed of its images' augmentation (`episode_seed(seed, epoch, i)`)."""
        rng = np.random.default_rng([seed, epoch])
        pairs = self.pairs
        picks = rng.permutation(len(pairs)) if n <= len(pairs) else rng.integers(len(pairs), size=n)
        episodes = []
        for i, pick in enumerate(picks[:n]):
            key, c = pairs[pick]
            episodes.append(Episode(c, key, self.sample_supports(rng, c, key), episode_seed(seed, epoch, i)))
        return episodes

    # --- loading ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(items) for items in self.class_items)

    def __getitem__(self, episode: Episode) -> dict:
        return self.load_episode(episode)

    def load_episode(self, episode: Episode) -> dict:
        r"""query_img [3,S,S] float, query_mask [S,S] uint8 (0/1/255), support_imgs [K,3,S,S],
        support_masks [K,S,S] uint8 (0/1), class_id, query_name, support_names. With an `augmentation` and a
        seeded (training) episode, image j (0: the query, then the supports) is augmented with a generator seeded
        by (episode seed, j) and entry j of the augmentation's plan (drawn from (episode seed, PLAN_STREAM))."""
        n = 1 + len(episode.supports)
        augment = self.augmentation is not None and episode.seed is not None
        rngs = [np.random.default_rng([episode.seed, j]) if augment else None for j in range(n)]
        plan = self.augmentation.plan(np.random.default_rng([episode.seed, PLAN_STREAM]), n) if augment else [None] * n
        q_img, q_mask = self.load_pair(episode.query, episode.class_id, rngs[0], plan[0])
        shots = [self.load_pair(key, episode.class_id, rng, part)
                 for key, rng, part in zip(episode.supports, rngs[1:], plan[1:])]
        s_masks = torch.stack([m for _, m in shots])
        s_masks[s_masks == IGNORE_INDEX] = 0
        return {'query_img': q_img, 'query_mask': q_mask,
                'support_imgs': torch.stack([img for img, _ in shots]), 'support_masks': s_masks,
                'class_id': torch.tensor(episode.class_id), 'query_name': episode.query,
                'support_names': list(episode.supports)}

    #: Data-path settings (set by test.py / train.py; copied into loader workers): `as_uint8` returns images as
    #: resized uint8 [3,S,S] for normalisation on the device (`normalize_images`; a quarter of the bytes to copy
    #: to a GPU), `cache_size` keeps up to that many decoded and resized (image, mask) pairs in memory shared by the
    #: loader's worker processes (`PairCache`: a target set is decoded once in total, not once per episode or per
    #: worker; decoding a full-size ISIC JPEG costs ~0.1-0.4 s). `augmentation` (train.py sets it on the training
    #: set only): a transform of data/augment.py.
    as_uint8 = False
    cache_size = 0
    augmentation = None

    @property
    def pair_cache(self) -> 'PairCache | None':
        r"""The shared cache of decoded pairs when `cache_size` > 0: the one `reserve_cache` made for an episode list,
        else one of `cache_size` slots made on first use (without loader workers)."""
        if not self.cache_size:
            return None
        cache = self.__dict__.get('_pair_cache')
        if cache is None or cache.limit != self.cache_size:
            cache = self.__dict__['_pair_cache'] = PairCache(self.cache_size, self.img_size)
        return cache

    def reserve_cache(self, episodes: list[Episode]) -> None:
        r"""A shared cache for the first `cache_size` distinct pairs of `episodes` (in order of first use), made
        before the loader's workers start so that every worker finds them, and no larger than they need
        (build_loader calls this)."""
        if not self.cache_size:
            return
        pairs = list(dict.fromkeys(pair for ep in episodes for pair in ep.pairs()))
        cache = PairCache(min(self.cache_size, len(pairs)), self.img_size, limit=self.cache_size)
        for pair in pairs[:cache.capacity]:
            cache.slot(pair, assign=True)
        self.__dict__['_pair_cache'] = cache

    def load_pair(self, key: str, class_id: int, rng: np.random.Generator | None = None, part=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(image, mask) of `key` at S x S; with `rng`, augmented by `augmentation` (with `part`, its plan's entry
        for this image) from the original image (an augmented pair is never cached)."""
        def decode():
            image = self.read_image(key)
            raw = self.read_mask(key, class_id)
            if raw.shape[:2] != (image.height, image.width):
                raise UserError(f'{self.name}: mask of {key!r} is {raw.shape[1]}x{raw.shape[0]} but its image is '
                                f'{image.width}x{image.height}')
            if rng is not None:
                image, raw = self.augmentation(image, raw, rng, self.img_size, part)
            return self.resize_image(image), self.transform_mask(raw)

        cache = self.pair_cache if rng is None else None
        img, mask = cache.get((key, class_id), decode) if cache is not None else decode()
        return (img if self.as_uint8 else normalize_images(img)), mask

    def resize_image(self, image: Image.Image) -> torch.Tensor:
        r"""Resize to SxS (bilinear, aspect ignored, as torchvision's Resize on PIL) -> uint8 [3,S,S]."""
        return image_uint8(image, self.img_size)

    def transform_image(self, image: Image.Image) -> torch.Tensor:
        r"""Resize to SxS (bilinear, aspect ignored, as torchvision's Resize on PIL), ToTensor, ImageNet norm."""
        return image_tensor(image, self.img_size)

    def transform_mask(self, mask: np.ndarray) -> torch.Tensor:
        return mask_tensor(mask, self.img_size)

    def conventions(self) -> dict:
        r"""The benchmark's comparability choices (e.g. Chest X-ray's population) as recorded in results.json."""
        return {}

    def describe(self) -> str:
        counts = ', '.join(f'{self.class_names[c]}: {len(self.class_items[c])}' for c in self.usable_classes)
        return f'{self.name}/{self.split}: {len(self.usable_classes)} classes ({counts})'


class PairCache:
    r"""Decoded, resized (image, mask) pairs in shared memory: `capacity` slots of uint8 [3,S,S] images and [S,S]
    masks (4 S^2 bytes each: 640 KB at 400x400), filled by whichever process needs a pair first and read by all.

    The pair -> slot table is fixed in the main process (`slot(..., assign=True)`, by `EpisodicDataset.reserve_cache`
    before the loader's workers start, or on first use without workers); a worker never adds a pair (its table is a
    copy), so a pair without a slot is decoded each time. Each slot is decoded once in total: a process claims an
    empty slot under the lock, decodes it outside the lock, and publishes it; another process that needs the slot
    meanwhile waits for it. `decoded` counts the decodes into slots (all processes).
    """

    EMPTY, BUSY, READY = 0, 1, 2

    def __init__(self, capacity: int, size: int, limit: int | None = None):
        import multiprocessing
        self.capacity, self.slots = capacity, {}
        self.limit = capacity if limit is None else limit          # the cache_size it was made for
        self.images = torch.zeros(capacity, 3, size, size, dtype=torch.uint8).share_memory_()
        self.masks = torch.zeros(capacity, size, size, dtype=torch.uint8).share_memory_()
        self.state = torch.zeros(capacity, dtype=torch.int8).share_memory_()
        self.counter = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.lock = multiprocessing.get_context().Lock()
        self.owner = os.getpid()

    @property
    def decoded(self) -> int:
        return int(self.counter[0])

    def slot(self, pair: tuple[str, int], assign: bool = False) -> int | None:
        r"""The pair's slot; with `assign`, a new one while slots are left (only in the process that made the cache)."""
        slot = self.slots.get(pair)
        if slot is None and assign and os.getpid() == self.owner and len(self.slots) < self.capacity:
            slot = self.slots[pair] = len(self.slots)
        return slot

    def get(self, pair: tuple[str, int], decode) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(image, mask) of `pair`: from its slot, or `decode()`d (into the slot when it has one)."""
        slot = self.slot(pair, assign=True)
        if slot is None:
            return decode()
        while True:
            with self.lock:
                state = int(self.state[slot])
                if state == self.EMPTY:
                    self.state[slot] = self.BUSY
                    break
            if state == self.READY:
                return self.images[slot].clone(), self.masks[slot].clone()
            time.sleep(0.001)                       # another process is decoding this pair
        try:
            img, mask = decode()
            self.images[slot].copy_(img)
            self.masks[slot].copy_(mask)
        except BaseException:
            with self.lock:
                self.state[slot] = self.EMPTY
            raise
        with self.lock:
            self.state[slot] = self.READY
            self.counter += 1
        return img, mask


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    r"""uint8 images [...,3,H,W] (0-255) -> float, ImageNet-normalised, on x's device (ToTensor + Normalize)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x.float().div_(255) - mean) / std


def image_uint8(image: Image.Image, size: int) -> torch.Tensor:
    r"""An RGB image resized to size x size (bilinear, aspect ignored, as torchvision's Resize on PIL); uint8
    [3,S,S]."""
    image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    r"""The model input of an RGB image: `image_uint8`, scaled to [0, 1] and ImageNet-normalised; [3,S,S] float.
    Every loader and predict.py use this."""
    return normalize_images(image_uint8(image, size))


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    r"""A label array [H,W] (uint8) resized to size x size with nearest neighbour (labels are never blended);
    [S,S] uint8."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None].float()
    return F.interpolate(m, (size, size), mode='nearest')[0, 0].to(torch.uint8)


def open_image(path: Path) -> Image.Image:
    r"""Open an image as RGB, turning a missing or corrupt file into a `UserError` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except FileNotFoundError as err:
        raise UserError(f'image file {path} does not exist') from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f'image file {path} is unreadable or corrupt ({err})') from err


def open_label(path: Path) -> np.ndarray:
    r"""Read a label/mask image as a 2D uint8 array (palette indices are kept, RGB/RGBA is converted to gray)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ('L', 'P', '1'):
                img = img.convert('L')
            arr = np.array(img)
    except FileNotFoundError as err:
        raise UserError(f'mask file {path} does not exist') from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f'mask file {path} is unreadable or corrupt ({err})') from err
    return arr.astype(np.uint8) if arr.dtype != np.uint8 else arr


def layout_error(dataset: EpisodicDataset, path: Path, what: str = 'folder', also: str = '') -> UserError:
    r"""The standard "missing path" error: names the path and shows the expected layout."""
    looked = f' (also looked for {also})' if also else ''
    return UserError(f'{dataset.name}: {what} {path} does not exist{looked}.\nExpected layout under --datapath '
                     f'{dataset.datapath}:\n{dataset.layout}')


def require_dirs(dataset: EpisodicDataset, *dirs: Path) -> None:
    r"""Fail with the expected layout when a required folder is missing."""
    for d in dirs:
        if not d.is_dir():
            raise layout_error(dataset, d)


def cache_file(dataset: EpisodicDataset, anchor: Path, name: str) -> Path:
    r"""Where to cache derived lists: next to the data when writable, else in ~/.cache/cdtg."""
    if anchor.is_dir() and _writable(anchor):
        return anchor / '.cdtg_cache' / name
    import hashlib
    tag = hashlib.sha1(str(anchor.resolve()).encode()).hexdigest()[:12]
    return Path.home() / '.cache' / 'cdtg' / f'{dataset.name}-{tag}' / name


def _writable(path: Path) -> bool:
    import os
    return os.access(path, os.W_OK)


def read_json(path: Path):
    return json.loads(path.read_text())


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{threading.get_ident()}.tmp')   # no global RNG draw
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


class FixedEpisodes(Sampler):
    r"""Yields a pre-sampled episode list in order (evaluation)."""

    def __init__(self, episodes: list[Episode]):
        self.episodes = list(episodes)

    def __iter__(self):
        return iter(self.episodes)

    def __len__(self) -> int:
        return len(self.episodes)


class TrainingEpisodes(Sampler):
    r"""Draws `n` fresh training episodes per epoch from (seed, epoch), in the main process. `set_epoch(epoch,
    start)` skips the first `start` episodes of that epoch (a run resumed from a mid-epoch checkpoint).

    In a distributed run (`shard(rank, world, global_bsz)`), the epoch's stream is cut into global batches of
    `global_bsz` episodes and process `rank` takes its `global_bsz / world` consecutive episodes of each: the union
    over the processes is exactly the single-process stream, step by step. A last, incomplete global batch is
    dropped (every process must take the same number of steps)."""

    def __init__(self, dataset: EpisodicDataset, n: int, seed: int):
        self.dataset, self.n, self.seed, self.epoch, self.start = dataset, n, seed, 0, 0
        self.rank, self.world, self.global_bsz = 0, 1, 1

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self, rank: int, world: int, global_bsz: int) -> 'TrainingEpisodes':
        if global_bsz % world:
            raise ValueError(f'a global batch of {global_bsz} cannot be split over {world} processes')
        self.rank, self.world, self.global_bsz = rank, world, global_bsz
        return self

    def __iter__(self):
        episodes = self.dataset.sample_training_episodes(self.n, self.seed, self.epoch)[self.start:]
        if self.world == 1:
            return iter(episodes)
        g, b = self.global_bsz, self.global_bsz // self.world
        return iter([e for s in range(len(episodes) // g)
                     for e in episodes[s * g + self.rank * b:s * g + (self.rank + 1) * b]])

    def __len__(self) -> int:
        if self.world == 1:
            return self.n - self.start
        return (self.n - self.start) // self.global_bsz * (self.global_bsz // self.world)


def collate_episodes(batch: list[dict]) -> dict:
    r"""Stack tensors; keep names as per-episode lists."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
