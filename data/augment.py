r"""Training augmentations of the methods' public code (train.py `--augmentation`, default: the method's recipe).

An augmentation transforms one image and its mask at their original size into the model's S x S input, drawing its
random numbers from the generator it is given; choices made once per episode (Q-Net: whether the query or the
supports are transformed) come from its `plan`, one entry per image (0: the query, then the supports). The loader
seeds those generators per training episode and image (`Episode.seed`, drawn from the run's seed, the epoch and the
episode's place in it), so the augmented images are the same for any number of workers and in a resumed run.
Evaluation episodes have no seed and are never augmented.
"""
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.constants import IGNORE_INDEX
from common.names import AUGMENTATIONS as AUGMENTATION_CLASSES




class Augmentation:
    r"""A training augmentation: `plan` draws the episode's choices, `__call__` transforms image j with `part`, the
    plan's entry j."""

    def plan(self, rng: np.random.Generator, n_images: int) -> list:
        r"""One entry per image of the episode (default: nothing decided per episode)."""
        return [None] * n_images

    def __call__(self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator, size: int,
                 part=None) -> tuple[Image.Image, np.ndarray]:
        raise NotImplementedError


@dataclass(frozen=True)
class FlipResizedCrop(Augmentation):
    r"""PMMs' training transform (`data/LoadDataSeg.py`: RandomHorizontalFlip, RandomResizedCrop(321, scale=(0.5,
    1.0))): a horizontal flip with probability 1/2, then a crop of a random 50-100 % of the image area with an aspect
    ratio in [3/4, 4/3] (width and height swapped with probability 1/2; 10 tries, else the central square), resized to
    S x S: the image bilinearly, the mask with nearest neighbour."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator, size: int,
                 part=None) -> tuple[Image.Image, np.ndarray]:
        if rng.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1]
        top, left, h, w = self.crop(image.width, image.height, rng)
        box = (left, top, left + w, top + h)
        image = image.crop(box).resize((size, size), Image.BILINEAR)
        label = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).crop(box).resize((size, size),
                                                                                          Image.NEAREST)
        return image, np.array(label)

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


@dataclass(frozen=True)
class GammaAffineElastic(Augmentation):
    r"""Q-Net's training transform (shenqq377/Q-Net @70a828d dataloaders/datasets.py:164-200 `gamma_tansform`,
    `geom_transform`, applied at :304-312; dataloaders/image_transforms.py `RandomAffine`, `ElasticTransform`, from
    SSL-ALPNet).

    Per episode (`plan`), each with probability 1/2: the gamma transform goes to the query or else to every support,
    and so does, independently, the geometric one. Each image is first resized to S x S (image bilinear, mask nearest:
    the reference transforms its slices at the network's input size, in pixels), then
    - gamma: γ ~ U(0.5, 1.5), x -> r((x - m + 1e-5) / r)^γ + m with m the image's minimum and r its range + 1e-5
      (the reference takes m and r over all the transformed images of the episode together: its 1-shot form);
    - geometric: the affine map Z·Sh·T·R (R a rotation by U(±5)° about the centre, T a shift of U(±5) px per axis,
      Sh a shear by U(±5)°, Z an isotropic zoom by U(0.9, 1.2) about the centre; composed in float32 as the
      reference) applied by bilinear interpolation with zeros outside (OpenCV's warpAffine with its `order=3`, which
      OpenCV reads as INTER_AREA and runs as bilinear for warps; OpenCV's 1/32-pixel fixed-point weights are not
      reproduced), then an elastic displacement (uniform noise in [-1, 1] per pixel and axis, blurred by a 21-tap
      Gaussian of σ 5 with reflect-101 borders, times α 10, cast to float32) applied by bilinear interpolation with
      half-sample-symmetric borders (scipy's map_coordinates(order=1, mode='reflect')).
    The mask is transformed with its image as a float channel and rounded (`np.rint`, as the reference); a label-255
    region travels as a second channel and wins where both round to 1. The images are uint8 again afterwards
    (rounded and clipped to 0-255; the gamma and both interpolations keep values within the image's range + 1e-5).
    """

    gamma: tuple[float, float] = (0.5, 1.5)
    rotate: float = 5.0
    shift: float = 5.0
    shear: float = 5.0
    zoom: tuple[float, float] = (0.9, 1.2)
    alpha: float = 10.0
    sigma: float = 5.0

    def plan(self, rng: np.random.Generator, n_images: int) -> list[tuple[bool, bool]]:
        r"""(gamma, geometric) per image: each on the query alone or on the supports alone, drawn in this order."""
        gamma_on_query, geometric_on_query = rng.random() > 0.5, rng.random() > 0.5
        return [(gamma_on_query == (j == 0), geometric_on_query == (j == 0)) for j in range(n_images)]

    def __call__(self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator, size: int,
                 part: tuple[bool, bool] = (True, True)) -> tuple[Image.Image, np.ndarray]:
        gamma, geometric = part
        pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float64)
        label = np.array(Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).resize((size, size),
                                                                                            Image.NEAREST))
        if gamma:
            pixels = gamma_transform(pixels, rng.uniform(*self.gamma))
        if geometric:
            layers = np.concatenate([pixels, (label == 1)[..., None], (label == IGNORE_INDEX)[..., None]], axis=-1)
            layers = warp_affine(layers, self.affine_matrix(size, rng))
            layers = elastic_warp(layers, self.displacement(size, rng))
            pixels = layers[..., :3]
            fg, ignore = np.rint(layers[..., 3]) == 1, np.rint(layers[..., 4]) == 1
            label = np.where(ignore, IGNORE_INDEX, fg).astype(np.uint8)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), label

    def affine_matrix(self, size: int, rng: np.random.Generator) -> np.ndarray:
        r"""The 3x3 map from input to output pixel coordinates (x = column, y = row), float32 as the reference's
        `RandomAffine.build_M`; its random numbers in the reference's order (angle, shift x, shift y, shear, zoom)."""
        centre = (size / 2, size // 2)            # (shape[0] / 2, shape[1] // 2), as the reference passes it
        rotation = rotation_matrix(centre, rng.uniform(-self.rotate, self.rotate), 1.0)
        shift = np.array([[1, 0, rng.uniform(-self.shift, self.shift)],
                          [0, 1, rng.uniform(-self.shift, self.shift)], [0, 0, 1]])
        theta = math.radians(rng.uniform(-self.shear, self.shear))
        shear = np.array([[1, -math.sin(theta), 0], [0, math.cos(theta), 0], [0, 0, 1]])
        zoom = rotation_matrix(centre, 0.0, rng.uniform(*self.zoom))
        return (zoom @ shear @ shift @ rotation).astype(np.float32)

    def displacement(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        r"""(dx, dy) [S,S] float32: the column and row displacement of every output pixel."""
        taps = int(4 * self.sigma) | 1
        return tuple((gaussian_blur(rng.random((size, size)) * 2 - 1, taps, self.sigma) * self.alpha)
                     .astype(np.float32) for _ in range(2))


def gamma_transform(pixels: np.ndarray, gamma: float) -> np.ndarray:
    r"""The reference's `gamma_tansform` of one image (float64 array)."""
    low = pixels.min()
    spread = pixels.max() - low + 1e-5
    return spread * np.power((pixels - low + 1e-5) / spread, gamma) + low


def rotation_matrix(centre: tuple[float, float], degrees: float, scale: float) -> np.ndarray:
    r"""3x3 form of OpenCV's getRotationMatrix2D(centre, degrees, scale): a counter-clockwise rotation (y pointing
    down) and a scaling about `centre` = (x, y)."""
    a, b = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
    x, y = centre
    return np.array([[a, b, (1 - a) * x - b * y], [-b, a, b * x + (1 - a) * y], [0, 0, 1]])


def bilinear_sample(layers: np.ndarray, rows: np.ndarray, cols: np.ndarray, border: str) -> np.ndarray:
    r"""`layers` [H,W,C] read at the real positions (rows, cols) [h,w] by bilinear interpolation; neighbours outside
    the image are 0 (`border='zero'`) or mirrored half-sample-symmetrically (`'reflect'`: ... b a | a b ... )."""
    h, w = layers.shape[:2]
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    out = np.zeros(rows.shape + layers.shape[2:], dtype=np.float64)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            r, c = r0 + dr, c0 + dc
            if border == 'zero':
                inside = ((r >= 0) & (r < h) & (c >= 0) & (c < w))[..., None]
                values = layers[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)] * inside
            else:
                values = layers[_mirror(r, h), _mirror(c, w)]
            out += wr * wc * values
    return out


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    index = np.mod(index, 2 * n)
    return np.where(index < n, index, 2 * n - 1 - index)


def warp_affine(layers: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    r"""Output pixel (x, y) = input at matrix⁻¹ (x, y) (OpenCV's warpAffine convention), bilinear, zeros outside."""
    h, w = layers.shape[:2]
    inverse = np.linalg.inv(matrix.astype(np.float64))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cols = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    rows = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    return bilinear_sample(layers, rows, cols, 'zero')


def elastic_warp(layers: np.ndarray, displacement: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    r"""Output pixel (row, col) = input at (row + dy, col + dx), bilinear, half-sample-symmetric borders."""
    dx, dy = displacement
    h, w = layers.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return bilinear_sample(layers, ys + dy, xs + dx, 'reflect')


def gaussian_blur(field: np.ndarray, taps: int, sigma: float) -> np.ndarray:
    r"""OpenCV's GaussianBlur(field, (taps, taps), sigma) in float64: the separable kernel exp(-i²/2σ²) normalised,
    borders reflected without repeating the edge (reflect-101)."""
    offsets = np.arange(taps) - (taps - 1) / 2
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    half = taps // 2
    for axis in (0, 1):
        padded = np.pad(field, [(half, half) if a == axis else (0, 0) for a in (0, 1)], mode='reflect')
        n = field.shape[axis]
        field = sum(k * np.take(padded, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
    return field


#: --augmentation name -> transform (None: the images are only resized).
AUGMENTATIONS = {name: globals()[cls]() if cls else None for name, cls in AUGMENTATION_CLASSES.items()}


#: The second seed word of an episode's plan generator (its images use 0, 1, ..., K).
PLAN_STREAM = 2 ** 32 - 1


def episode_seed(seed: int, epoch: int, index: int) -> int:
    r"""The augmentation seed of training episode `index` of `epoch` in a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
