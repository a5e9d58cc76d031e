r"""Procedural benchmarks, generated on first use: `synthetic` (natural-like source) and `synthetic-med` (target).

* `synthetic`: 12 object classes told apart by shape, colour and texture, 1-2 objects per image on cluttered,
  colourful backgrounds (random gradients, distractor polygons and lines). Splits `trn` and `val` hold different
  images of the same classes (the val split is for source-side model selection).
* `synthetic-med`: a grayscale, low-contrast, noisy "medical" domain with 4 classes in three kinds of scene: skin
  (lesion), blood smear (cell nucleus and cytoplasm, with red-cell distractors) and chest radiograph (lungs).
  Split `test` only: it is a target domain.

Images are written once as PNG files with label maps (0 = background, c+1 = class c) under
`<datapath>/<benchmark>/` together with a manifest; the content depends only on the generator version, never on
the run's seed. The loader then reads them like any real dataset.
"""
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:                  # not POSIX (Windows): generation is not locked against concurrent runs
    fcntl = None

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.errors import UserError
from data.episodic import EpisodicDataset, open_image, open_label, read_json, write_json_atomic

GENERATOR_VERSION = 3
SIZE = 160

# name, shape, RGB colour, texture
NATURAL_CLASSES = [
    ('red circle', 'circle', (215, 45, 40), 'solid'),
    ('blue square', 'square', (40, 75, 215), 'solid'),
    ('green triangle', 'triangle', (45, 170, 60), 'solid'),
    ('yellow star', 'star', (235, 205, 40), 'solid'),
    ('purple ring', 'ring', (145, 60, 185), 'solid'),
    ('orange cross', 'cross', (245, 135, 30), 'solid'),
    ('cyan diamond', 'diamond', (40, 200, 205), 'solid'),
    ('black and white striped ellipse', 'ellipse', (235, 235, 235), 'stripes'),
    ('brown checkered hexagon', 'hexagon', (150, 95, 45), 'checker'),
    ('pink dotted pentagon', 'pentagon', (240, 130, 180), 'dots'),
    ('gray speckled crescent', 'crescent', (160, 160, 160), 'speckle'),
    ('lime wavy rectangle', 'rectangle', (165, 225, 60), 'waves'),
]
MEDICAL_CLASSES = ['skin lesion', 'cell nucleus', 'cell cytoplasm', 'lung']
SPLIT_SIZES = {'synthetic': {'trn': 360, 'val': 96}, 'synthetic-med': {'test': 180}}


# --- shapes -----------------------------------------------------------------------------------------------------
def _polygon(cx, cy, radii, angles, rot):
    return [(cx + r * np.cos(a + rot), cy + r * np.sin(a + rot)) for r, a in zip(radii, angles)]


def _regular(cx, cy, r, n, rot, inner=None):
    if inner is None:
        angles = np.arange(n) * 2 * np.pi / n
        return _polygon(cx, cy, [r] * n, angles, rot)
    angles = np.arange(2 * n) * np.pi / n
    return _polygon(cx, cy, [r if i % 2 == 0 else inner for i in range(2 * n)], angles, rot)


def shape_mask(shape: str, cx: float, cy: float, r: float, rot: float, size: int = SIZE) -> np.ndarray:
    r"""Binary mask of one object of radius ~r centred at (cx, cy)."""
    canvas = Image.new('L', (size, size), 0)
    d = ImageDraw.Draw(canvas)
    if shape == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == 'square':
        d.polygon(_regular(cx, cy, r * 1.15, 4, rot), fill=1)
    elif shape == 'triangle':
        d.polygon(_regular(cx, cy, r * 1.2, 3, rot), fill=1)
    elif shape == 'star':
        d.polygon(_regular(cx, cy, r * 1.25, 5, rot, inner=r * 0.5), fill=1)
    elif shape == 'ring':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif shape == 'cross':
        w = 0.35 * r
        for a in (rot, rot + np.pi / 2):
            c, s = np.cos(a), np.sin(a)
            pts = [(-r, -w), (r, -w), (r, w), (-r, w)]
            d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=1)
    elif shape == 'diamond':
        d.polygon(_polygon(cx, cy, [r * 1.2, r * 0.7] * 2, np.arange(4) * np.pi / 2, rot), fill=1)
    elif shape == 'ellipse':
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = [(r * 1.2 * np.cos(a), r * 0.6 * np.sin(a)) for a in t]
        c, s = np.cos(rot), np.sin(rot)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=1)
    elif shape == 'hexagon':
        d.polygon(_regular(cx, cy, r * 1.05, 6, rot), fill=1)
    elif shape == 'pentagon':
        d.polygon(_regular(cx, cy, r * 1.1, 5, rot), fill=1)
    elif shape == 'crescent':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        ox, oy = 0.45 * r * np.cos(rot), 0.45 * r * np.sin(rot)
        d.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r], fill=0)
    elif shape == 'rectangle':
        c, s = np.cos(rot), np.sin(rot)
        pts = [(-1.3 * r, -0.55 * r), (1.3 * r, -0.55 * r), (1.3 * r, 0.55 * r), (-1.3 * r, 0.55 * r)]
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=1)
    else:
        raise ValueError(shape)
    return np.asarray(canvas, dtype=bool)


def blob_mask(rng, cx, cy, r, irregularity=0.25, size=SIZE, lobes=5) -> np.ndarray:
    r"""Irregular closed blob: r(θ) = r·(1 + Σ_k a_k sin(kθ + φ_k))."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 2 + lobes):
        radius += rng.uniform(0, irregularity) / (k - 1) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    canvas = Image.new('L', (size, size), 0)
    ImageDraw.Draw(canvas).polygon(_polygon(cx, cy, r * radius, t, 0.0), fill=1)
    return np.asarray(canvas, dtype=bool)


# --- textures ---------------------------------------------------------------------------------------------------
def texture(kind: str, rng, size: int = SIZE) -> np.ndarray:
    r"""Multiplicative intensity pattern in [0, 1.1] for a class texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = xx * np.cos(a) + yy * np.sin(a)
    if kind == 'solid':
        return np.ones((size, size), np.float32)
    if kind == 'stripes':
        return np.where(np.sin(u * 2 * np.pi / rng.uniform(7, 10)) > 0, 1.0, 0.15).astype(np.float32)
    if kind == 'checker':
        p = rng.uniform(6, 9)
        return np.where((np.floor(xx / p) + np.floor(yy / p)) % 2 == 0, 1.0, 0.45).astype(np.float32)
    if kind == 'dots':
        p = rng.uniform(6, 8)
        d = np.hypot((xx % p) - p / 2, (yy % p) - p / 2)
        return np.where(d < p * 0.28, 0.35, 1.0).astype(np.float32)
    if kind == 'speckle':
        return rng.uniform(0.55, 1.1, (size, size)).astype(np.float32)
    if kind == 'waves':
        v = -xx * np.sin(a) + yy * np.cos(a)
        return (0.75 + 0.3 * np.sin((u + 4 * np.sin(v / 5)) * 2 * np.pi / 9)).astype(np.float32)
    raise ValueError(kind)


def _smooth_noise(rng, size, scale, sigma):
    low = rng.normal(0, 1, (size // scale + 2, size // scale + 2)).astype(np.float32)
    img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) * sigma


# --- scenes -----------------------------------------------------------------------------------------------------
def natural_scene(rng: np.random.Generator, classes: list[int], size: int = SIZE):
    r"""RGB image and label map (c+1 per class pixel) with the given object classes on a cluttered background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    a = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(a) * xx + np.sin(a) * yy)[..., None]
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    img = c0 * (1 - ramp) + c1 * ramp + _smooth_noise(rng, size, 16, 18)[..., None]
    clutter = Image.new('RGB', (size, size), 0)
    cmask = Image.new('L', (size, size), 0)
    dc, dm = ImageDraw.Draw(clutter), ImageDraw.Draw(cmask)
    for _ in range(rng.integers(5, 11)):
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(rng.integers(3, 6))]
            dc.polygon(pts, fill=colour)
            dm.polygon(pts, fill=1)
        else:
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
            w = int(rng.integers(1, 4))
            dc.line(pts, fill=colour, width=w)
            dm.line(pts, fill=1, width=w)
    cm = np.asarray(cmask, dtype=bool)
    img[cm] = 0.5 * img[cm] + 0.5 * np.asarray(clutter, dtype=np.float32)[cm]
    label = np.zeros((size, size), np.uint8)
    for c in classes:
        _, shape, colour, tex = NATURAL_CLASSES[c]
        r = rng.uniform(0.17, 0.27) * size
        cx, cy = rng.uniform(r, size - r, 2)
        m = shape_mask(shape, cx, cy, r, rng.uniform(0, 2 * np.pi), size)
        col = np.clip(np.array(colour) + rng.normal(0, 12, 3), 0, 255) * rng.uniform(0.8, 1.1)
        obj = col[None, None, :] * texture(tex, rng, size)[..., None]
        img[m] = obj[m]
        label[m] = c + 1
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def medical_scene(rng: np.random.Generator, kind: str, size: int = SIZE):
    r"""Grayscale (replicated to RGB), low-contrast, noisy scene. kind: skin | cell | chest.
    Labels: 1 skin lesion, 2 cell nucleus, 3 cell cytoplasm, 4 lung."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    if kind == 'skin':
        img = rng.uniform(150, 190) + _smooth_noise(rng, size, 8, 6) + _smooth_noise(rng, size, 40, 10)
        r = rng.uniform(0.18, 0.3) * size
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        m = blob_mask(rng, cx, cy, r, irregularity=0.35, size=size)
        inside = -rng.uniform(40, 70) + _smooth_noise(rng, size, 10, 8)
        img = img + np.where(m, inside, 0)
        hairs = Image.new('L', (size, size), 0)
        dh = ImageDraw.Draw(hairs)
        for _ in range(rng.integers(2, 7)):
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(3)]
            dh.line(pts, fill=1, width=1)
        img = np.where(np.asarray(hairs, dtype=bool), img - rng.uniform(30, 60), img)
        label[m] = 1
    elif kind == 'cell':
        img = rng.uniform(140, 170) + _smooth_noise(rng, size, 12, 5)
        for _ in range(rng.integers(3, 8)):   # red blood cells: faint darker discs with a pale centre
            rc = rng.uniform(0.08, 0.12) * size
            px, py = rng.uniform(0, size, 2)
            d = np.hypot(xx - px, yy - py)
            img = img - np.where(d < rc, 14, 0) + np.where(d < 0.45 * rc, 7, 0)
        r = rng.uniform(0.25, 0.33) * size
        cx, cy = rng.uniform(0.4, 0.6, 2) * size
        cyto = blob_mask(rng, cx, cy, r, irregularity=0.15, size=size)
        nuc = blob_mask(rng, cx + rng.uniform(-0.2, 0.2) * r, cy + rng.uniform(-0.2, 0.2) * r,
                        r * rng.uniform(0.45, 0.6), irregularity=0.5, size=size, lobes=4) & cyto
        img = img + np.where(cyto, rng.uniform(18, 30), 0) - np.where(nuc, rng.uniform(50, 80), 0)
        img = img + np.where(cyto, _smooth_noise(rng, size, 6, 6), 0)
        label[cyto] = 3
        label[nuc] = 2
    elif kind == 'chest':
        body = ((xx - size / 2) / (0.46 * size)) ** 2 + ((yy - size * 0.55) / (0.55 * size)) ** 2 < 1
        img = np.where(body, rng.uniform(150, 185), rng.uniform(25, 45)) + _smooth_noise(rng, size, 20, 8)
        img = img + 6 * np.sin(yy * 2 * np.pi / rng.uniform(11, 15) + 0.02 * (xx - size / 2) ** 2 / size * 8)
        lungs = np.zeros((size, size), bool)
        for side in (-1, 1):
            cx = size / 2 + side * rng.uniform(0.17, 0.22) * size
            cy = rng.uniform(0.48, 0.55) * size
            rx, ry = rng.uniform(0.12, 0.16) * size, rng.uniform(0.26, 0.32) * size
            lungs |= (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1) & body
        img = img - np.where(lungs, rng.uniform(50, 80), 0)
        label[lungs] = 4
    else:
        raise ValueError(kind)
    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0)),
                     dtype=np.float32)
    img = img + rng.normal(0, rng.uniform(4, 8), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2), label


# --- generation and loading -------------------------------------------------------------------------------------
def _generate(benchmark: str, root: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f'.{benchmark}-', dir=root.parent))
    try:
        (tmp / 'images').mkdir()
        (tmp / 'labels').mkdir()
        files = {}
        for split_code, (split, n) in enumerate(SPLIT_SIZES[benchmark].items()):
            names = []
            for i in range(n):
                rng = np.random.default_rng([GENERATOR_VERSION, 1 if benchmark == 'synthetic' else 2, split_code, i])
                if benchmark == 'synthetic':
                    classes = [i % len(NATURAL_CLASSES)]
                    if rng.random() < 0.5:
                        other = int(rng.integers(len(NATURAL_CLASSES) - 1))
                        classes.append(other + (other >= classes[0]))
                    img, label = natural_scene(rng, classes)
                else:
                    img, label = medical_scene(rng, ('skin', 'cell', 'chest')[i % 3])
                name = f'{split}_{i:04d}'
                Image.fromarray(img).save(tmp / 'images' / f'{name}.png')
                Image.fromarray(label).save(tmp / 'labels' / f'{name}.png')
                names.append(name)
            files[split] = names
        write_json_atomic(tmp / 'manifest.json', {'generator_version': GENERATOR_VERSION, 'size': SIZE,
                                                  'files': files})
        if root.exists():
            shutil.rmtree(root)
        tmp.replace(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _up_to_date(root: Path) -> bool:
    manifest = root / 'manifest.json'
    try:
        return manifest.is_file() and read_json(manifest).get('generator_version') == GENERATOR_VERSION
    except ValueError:
        return False


def ensure_generated(benchmark: str, datapath: Path) -> Path:
    r"""Generate `<datapath>/<benchmark>/` unless an up-to-date copy exists; returns that folder.

    Concurrent runs are safe: generation happens under an exclusive lock on `<datapath>/.<benchmark>.lock`, the
    check is repeated once the lock is held (so a second run waits and then uses the first run's data), and the
    finished folder is moved into place in one rename."""
    root = datapath / benchmark
    if _up_to_date(root):
        return root
    try:
        datapath.mkdir(parents=True, exist_ok=True)
        with open(datapath / f'.{benchmark}.lock', 'w') as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)             # released when the file closes
            if not _up_to_date(root):
                _generate(benchmark, root)
    except OSError as err:
        raise UserError(f'cannot write the generated {benchmark} data under {datapath} ({err}); pass a writable '
                        '--datapath') from err
    return root


class _Procedural(EpisodicDataset):
    class_names_: list[str] = []

    def build_index(self):
        self.root = ensure_generated(self.name, self.datapath)
        manifest = read_json(self.root / 'manifest.json')
        items: list[list[str]] = [[] for _ in self.class_names_]
        for name in manifest['files'][self.split]:
            label = open_label(self.root / 'labels' / f'{name}.png')
            counts = np.bincount(label.ravel(), minlength=len(self.class_names_) + 1)
            for c in range(len(self.class_names_)):
                if counts[c + 1] >= 0.01 * label.size:    # visible enough to serve as query or support
                    items[c].append(name)
        return list(self.class_names_), items

    def read_image(self, key):
        return open_image(self.root / 'images' / f'{key}.png')

    def read_mask(self, key, class_id):
        return (open_label(self.root / 'labels' / f'{key}.png') == class_id + 1).astype(np.uint8)


class Synthetic(_Procedural):
    r"""Natural-like source domain: 12 classes of coloured, textured shapes on clutter."""
    name = 'synthetic'
    domain = 'source'
    splits = ('trn', 'val')
    class_names_ = [c[0] for c in NATURAL_CLASSES]
    layout = '  synthetic/  (generated automatically on first use)'


class SyntheticMed(_Procedural):
    r"""Medical-like target domain: skin lesion, cell nucleus, cell cytoplasm, lung (grayscale, noisy)."""
    name = 'synthetic-med'
    domain = 'target'
    splits = ('test',)
    class_names_ = MEDICAL_CLASSES
    layout = '  synthetic-med/  (generated automatically on first use)'


def elliptic_episode(size: int, shots: int, batch: int = 1, seed: int = 0, radius_span: float = 0.2,
                     query_mask: bool = True) -> dict:
    r"""A random episode batch for benchmarks, precision checks and golden files: Gaussian-noise images and elliptic
    masks (centres in [0.3, 0.7], radii in [0.15, 0.15 + `radius_span`] of the side), drawn from `seed` alone. Keys
    as a loader batch (query_img, support_imgs, support_masks, class_id 0, and query_mask unless `query_mask` is
    False, which also draws no query ellipse)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=gen)
    support = torch.randn(batch, shots, 3, size, size, generator=gen)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    n = shots + int(query_mask)
    centre = 0.3 + 0.4 * torch.rand(batch, n, 2, generator=gen)
    radius = 0.15 + radius_span * torch.rand(batch, n, 2, generator=gen)
    masks = (((yy - centre[..., 0, None, None]) / radius[..., 0, None, None]) ** 2
             + ((xx - centre[..., 1, None, None]) / radius[..., 1, None, None]) ** 2 <= 1).float()
    out = {'query_img': query, 'support_imgs': support, 'support_masks': masks[:, int(query_mask):]}
    if query_mask:
        out['query_mask'] = masks[:, 0].long()
    out['class_id'] = torch.zeros(batch, dtype=torch.long)
    return out
