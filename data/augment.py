r"""Training augmentations of the methods' public code (train.py `--augmentation`, default: the method's recipe).

An augmentation transforms one image and its mask at their original size into the model's S x S input, drawing its
random numbers from the generator it is given. The loader seeds that generator per training episode and image
(`Episode.seed`, drawn from the run's seed, the epoch and the episode's place in it), so the augmented images are the
same for any number of workers and in a resumed run. Evaluation episodes have no seed and are never augmented.
"""
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.names import AUGMENTATION_NAMES


@dataclass(frozen=True)
class FlipResizedCrop:
    r"""PMMs' training transform (`data/LoadDataSeg.py`: RandomHorizontalFlip, RandomResizedCrop(321, scale=(0.5,
    1.0))): a horizontal flip with probability 1/2, then a crop of a random 50-100 % of the image area with an aspect
    ratio in [3/4, 4/3] (width and height swapped with probability 1/2; 10 tries, else the central square), resized to
    S x S: the image bilinearly, the mask with nearest neighbour."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator,
                 size: int) -> tuple[Image.Image, np.ndarray]:
        if rng.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1]
        top, left, h, w = self.crop(image.width, image.height, rng)
        box = (left, top, left + w, top + h)
        image = image.crop(box).resize((size, size), Image.BILINEAR)
        label = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).crop(box).resize((size, size),
                                                                                          Image.NEAREST)
        return image, np.asarray(label)

    def crop(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        r"""(top, left, height, width) of the crop, as the reference's `RandomResizedCrop.get_params`."""
        area = width * height
        for _ in range(10):
            target = rng.uniform(*self.scale) * area
            aspect = rng.uniform(*self.ratio)
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if rng.random() < 0.5:
                w, h = h, w
            if w <= width and h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side


#: --augmentation name -> transform (None: the images are only resized).
AUGMENTATIONS = {'none': None, 'flip-resized-crop': FlipResizedCrop()}
assert tuple(AUGMENTATIONS) == AUGMENTATION_NAMES


def episode_seed(seed: int, epoch: int, index: int) -> int:
    r"""The augmentation seed of training episode `index` of `epoch` in a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
