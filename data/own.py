r"""The user's own images for predict.py: support (image, mask) pairs given one by one (`IMAGE:MASK`) or as a folder
paired by the target loaders' rules (`DIR/images/` + `DIR/masks/` by stem, or one flat folder where
`<stem>_mask.*` / `<stem>_segmentation.*` or a `<stem>.png` beside a non-PNG `<stem>.*` is the mask of `<stem>`),
each read as a viewer shows it and checked; degenerate supports found and counted; query files collected from files
and folders and decoded once before any work; a distinct output name per query.
"""
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from common.constants import FEW_FOREGROUND, MIN_IMG_SIZE
from common.errors import UserError
from data.checks import (IMAGE_EXTENSIONS, WIDE_MODES, DataReport, inspect_file, list_files, open_binary_mask,
                         open_rgb, pair_by_stem)
from data.episodic import image_tensor, mask_tensor

MASK_SUFFIXES = ('_mask', '_segmentation')         # the Chest X-ray and ISIC conventions
#: Degenerate supports: summary.json key -> warning.
DEGENERATE = {
    'all_foreground': 'its mask is foreground everywhere at {size}x{size}: no background to contrast with',
    'few_foreground': 'only {n} foreground pixels at {size}x{size} (fewer than {few}): a prototype of a few pixels',
    'small_image': 'its image has a side under {min_side} pixels, less than one cell of the deepest feature map',
    'repeated': 'the same support as {same}: it adds no information',
}


def split_support(spec: str) -> tuple[Path, Path]:
    r"""`IMAGE:MASK` -> paths. Paths may contain ':' themselves: the split whose two sides both exist wins."""
    cuts = [i for i, ch in enumerate(spec) if ch == ':']
    if not cuts:
        raise UserError(f'--support {spec}: expected IMAGE:MASK (an image and its mask, separated by ":")')
    for i in cuts:
        if Path(spec[:i]).is_file() and Path(spec[i + 1:]).is_file():
            return Path(spec[:i]), Path(spec[i + 1:])
    image, mask = Path(spec[:cuts[-1]]), Path(spec[cuts[-1] + 1:])
    missing = image if not image.is_file() else mask
    raise UserError(f'--support {spec}: {missing} does not exist (expected IMAGE:MASK)')


def _mask_stem(stem: str) -> str | None:
    r"""The image stem a mask file stem belongs to (`x_mask` -> `x`), or None when it carries no mask suffix."""
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return None


def pair_support_dir(folder: Path) -> list[tuple[Path, Path]]:
    r"""(image, mask) pairs of a support folder, by the loaders' rules (see the module docstring)."""
    if not folder.is_dir():
        raise UserError(f'--support-dir {folder} is not a folder')
    if (folder / 'images').is_dir() and (folder / 'masks').is_dir():
        images = {p.stem: p for p in list_files(folder / 'images', IMAGE_EXTENSIONS)}
        masks = {(_mask_stem(p.stem) or p.stem): p for p in list_files(folder / 'masks', IMAGE_EXTENSIONS)}
        mask_dir = folder / 'masks'
    else:
        files = list_files(folder, IMAGE_EXTENSIONS)
        masks = {_mask_stem(p.stem): p for p in files if _mask_stem(p.stem)}
        rest = [p for p in files if not _mask_stem(p.stem)]
        stems = {}
        for p in rest:
            stems.setdefault(p.stem, []).append(p)
        images = {}
        for stem, group in stems.items():
            pngs = [p for p in group if p.suffix.lower() == '.png']
            others = [p for p in group if p.suffix.lower() != '.png']
            if others and pngs and stem not in masks:            # FSS-1000: n.jpg + n.png
                masks[stem] = pngs[0]
            images[stem] = (others or pngs)[0]
        mask_dir = folder
    if not images:
        raise UserError(f'--support-dir {folder} holds no images ({", ".join(IMAGE_EXTENSIONS)}); expected '
                        'images/ + masks/, or <stem>.* with <stem>_mask.* in one folder')
    report = DataReport('support', folder, full=False)
    pairs = pair_by_stem(report, images, masks, mask_dir, '', full=False)
    problems = []
    for p in report.hard:
        if p.kind == 'image_without_mask':
            problems.append(f'{p.path}: no mask (expected {mask_dir}/{Path(p.path).stem}_mask.png or '
                            f'{mask_dir}/{Path(p.path).stem}.png)')
        else:
            problems.append(p.line())
    if problems:
        raise UserError(f'--support-dir {folder}:\n  ' + '\n  '.join(problems))
    for p in report.soft:
        print(f'note: {p.line()}')
    return [(image, mask) for _, image, mask in pairs]


def read_support(image_path: Path, mask_path: Path) -> tuple[Image.Image, np.ndarray]:
    r"""One support's image (RGB) and binary mask as a viewer shows them, checked: readable, same size, some
    foreground."""
    image = open_rgb(image_path, upright=True)
    mask = open_binary_mask(mask_path, upright=True)
    if mask.shape != (image.height, image.width):
        raise UserError(f'support mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is '
                        f'{image.width}x{image.height}; a mask must have its image\'s size')
    if not mask.any():
        raise UserError(f'support mask {mask_path} has no foreground pixel (read as {mask_rule(mask_path)}); an '
                        'empty support carries no information')
    return image, mask


def load_support(image_path: Path, mask_path: Path, size: int) -> dict:
    r"""One support as model inputs of `size` and as a record for summary.json (with its `degenerate` findings)."""
    image, mask = read_support(image_path, mask_path)
    small = mask_tensor(mask, size)
    if not small.any():
        raise UserError(f'the foreground of support mask {mask_path} ({int(mask.sum())} pixels) vanishes when the '
                        f'mask is resized to the model\'s {size}x{size}; use a support where the structure is larger')
    found = []
    if small.all():
        found.append('all_foreground')
    elif int(small.sum()) < FEW_FOREGROUND:
        found.append('few_foreground')
    if min(image.width, image.height) < MIN_IMG_SIZE:
        found.append('small_image')
    return {'img': image_tensor(image, size), 'mask': small,
            'record': {'image': str(image_path), 'mask': str(mask_path), 'size': [image.width, image.height],
                       'foreground_fraction': round(float(mask.mean()), 6),
                       'foreground_pixels_at_model_size': int(small.sum()), 'degenerate': found}}


def check_supports(supports: list[dict], specs: list[tuple[Path, Path]], size: int, strict: bool) -> dict:
    r"""Mark repeated supports (the same image and mask files, or identical pixels and mask at the model size), then
    warn about every degenerate support (`--strict-shots`: refuse); returns the counts per finding for summary.json."""
    seen = {}
    for s, (image_path, mask_path) in zip(supports, specs):
        key = (str(image_path.resolve()), str(mask_path.resolve()))
        content = (s['img'].numpy().tobytes(), s['mask'].numpy().tobytes())
        first = seen.get(key) or seen.get(content)
        if first is not None:
            s['record']['degenerate'].append('repeated')
            s['record']['same_as'] = first
        seen.setdefault(key, str(image_path))
        seen.setdefault(content, str(image_path))
    counts = {kind: 0 for kind in DEGENERATE}
    lines = []
    for s in supports:
        for kind in s['record']['degenerate']:
            counts[kind] += 1
            detail = DEGENERATE[kind].format(size=size, same=s['record'].get('same_as'), few=FEW_FOREGROUND,
                                             min_side=MIN_IMG_SIZE, n=s['record']['foreground_pixels_at_model_size'])
            lines.append(f'support {s["record"]["image"]}: {detail}')
    if lines and strict:
        raise UserError('--strict-shots: degenerate supports:\n  ' + '\n  '.join(lines))
    for line in lines:
        warnings.warn(f'{line} (counted in summary.json; --strict-shots refuses it)', stacklevel=2)
    return counts


def mask_rule(path: Path) -> str:
    with Image.open(path) as img:
        mode = img.mode
    if mode == 'P':
        return 'a palette image'
    if mode in WIDE_MODES:
        return 'a 16/32-bit image: foreground = 1, >= 128 or >= 32768 depending on its maximum'
    if mode in ('RGB', 'RGBA', 'LA'):
        return ('a colour image: foreground where any of R, G, B is >= 128 (= 1 for 0/1 masks), or where alpha >= '
                '128 when it has transparency')
    return 'gray values: foreground >= 128, or = 1 for 0/1 masks'


def collect_queries(specs: list[str], exclude: set[Path]) -> list[Path]:
    r"""Query files from files and folders (a folder's images, not recursive, minus the support files)."""
    if not specs:
        raise UserError('--query PATH is required: an image or a folder of images to segment')
    queries: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = [p for p in list_files(path, IMAGE_EXTENSIONS) if p.resolve() not in exclude]
            if not found:
                raise UserError(f'--query {path}: no query images in this folder (extensions: '
                                f'{", ".join(IMAGE_EXTENSIONS)}; support files are not queries)')
            queries.extend(found)
        elif path.is_file():
            queries.append(path)
        else:
            raise UserError(f'--query {path} does not exist')
    for q in queries:                                   # decode each once now: a bad file stops us before any work
        size, _, err = inspect_file(q, full=True)
        if err:
            raise UserError(f'query image {q} is {err if err.startswith("unreadable") else "unreadable: " + err}')
        with Image.open(q) as img:
            wide = img.mode in WIDE_MODES
        if wide:                                        # 16-bit / float: NaN or inf refused now, naming the file
            open_rgb(q, upright=True)
    return list(dict.fromkeys(queries))


def output_names(queries: list[Path]) -> list[str]:
    r"""A distinct output name per query: its stem, or stem_ext / stem_N when stems collide."""
    names, taken = [], set()
    stems = [q.stem for q in queries]
    for q in queries:
        name = q.stem if stems.count(q.stem) == 1 else f'{q.stem}_{q.suffix.lstrip(".").lower()}'
        base, n = name, 1
        while name in taken:
            n += 1
            name = f'{base}_{n}'
        taken.add(name)
        names.append(name)
    return names
