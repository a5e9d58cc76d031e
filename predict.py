r"""Segment your own images from K annotated examples with any trained checkpoint.

    python predict.py --load logs/run/best.pt --support a.png:a_mask.png --support b.jpg:b_mask.png \
        --query photos/ --out preds/
    python predict.py --load best.pt --support-dir examples/ --query scan.png --out preds/ --class-name lung
    python predict.py --load best.pt --support-dir examples/ --query photos/ --out preds/ \
        --description "A photo of a polyp, a small rounded pink bulge on the bowel wall."

Supports: `--support IMAGE:MASK` (repeatable) and/or `--support-dir DIR`, paired as the target loaders pair files:
`DIR/images/` + `DIR/masks/` by stem, or one flat folder where `<stem>_mask.*` / `<stem>_segmentation.*` (Chest
X-ray, ISIC) or `<stem>.png` next to a non-PNG `<stem>.*` (FSS-1000) is the mask of `<stem>`. Masks may be 0/255,
0/1, 16-bit, RGB(A) or palette PNGs (any R, G or B >= 128 is foreground in an RGB mask; see
`data.checks.open_binary_mask` for the exact rule). Queries: files or folders (`--query`, repeatable), any size,
aspect ratio and mode (gray, RGB, RGBA, 16-bit, float: `data.checks.wide_to_uint8`). Every image and mask is read as
a viewer shows it (its EXIF orientation applied). Every query is predicted at the checkpoint's image size (as in
training and test.py) and its logits are resized back to the displayed size. Writes into --out: `masks/<name>.png`
(0/255, that size), `overlays/<name>.jpg` (the prediction in red over the image) and `summary.json`.

Nothing a user gives is lost: every input is checked before the model runs; --out may not be, hold or lie inside
an input (checkpoint, supports, queries); the folder is locked while the command runs; its new contents appear only
when complete (staged inside it, then moved in), and `--overwrite` replaces only the files an earlier predict.py
wrote there (listed in its `.written-by.json`), never anything else. Degenerate supports (all foreground, fewer than
16 foreground pixels at the model's size, an image side under 32 pixels, the same support twice) are warned about and
counted in summary.json; `--strict-shots` refuses them.

CD-TG checkpoints need the class's text: `--class-name NAME` looks it up in text/descriptions/*.yaml (`--benchmark
BENCHMARK` picks the file; `--descriptions FILE` uses your own), or `--description "..."` gives a one-off
description that is encoded on the fly (`--background-description` for the background; default the reference's
background caption, text/settings.py GENERIC_BACKGROUND). Test-time adaptation (`--finetune-steps/--finetune-lr`)
adapts on the supports of every query separately, as in test.py. Supports and queries are read by data/own.py.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.config import parse_with_config
from common.errors import UserError, run_cli
from common.logger import staged_folder
from common.paths import check_apart_from_inputs, check_creatable_folder
from common.utils import configure_backends, resolve_device, seed_everything
from data.checks import open_rgb
from data.episodic import image_tensor
from data.own import (check_supports, collect_queries, load_support, output_names, pair_support_dir, read_support,
                      split_support)
from engine.factory import adaptation_record, load_model, plugin_record
from engine.flags import add_adaptation_args, add_config_arg, add_plugin_args, add_runtime_args
from text.settings import GENERIC_BACKGROUND
from model.base import Output

# Logits are resized to the original size in one piece up to this many values (256 MiB in float32); larger images
# are predicted at the largest size under it and the binary mask is enlarged with nearest neighbour.
MAX_UPSAMPLED = 2 ** 26


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Segment your own images from K annotated examples.')
    add_config_arg(p)
    p.add_argument('--load', type=str, default=None, help='checkpoint (best.pt / last.pt written by train.py)')
    p.add_argument('--support', action='append', default=[], metavar='IMAGE:MASK',
                   help='an annotated example (repeat for K > 1)')
    p.add_argument('--support-dir', type=str, default=None,
                   help='a folder of annotated examples: images/ + masks/, or <stem>.* with <stem>_mask.*')
    p.add_argument('--query', action='append', default=[], metavar='PATH',
                   help='an image or a folder of images to segment (repeatable)')
    p.add_argument('--out', type=str, default=None,
                   help='output folder (new or empty; never an input folder, nor one holding or inside an input)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the outputs of an earlier predict.py in --out once the new ones are complete (only '
                        'the files it wrote; anything else stops the command)')
    p.add_argument('--strict-shots', action='store_true',
                   help='refuse degenerate supports (all foreground, < 16 foreground pixels at the model size, an '
                        'image side < 32 px, the same support twice) instead of warning about them')
    p.add_argument('--class-name', type=str, default=None,
                   help='CD-TG: the class whose description to use (text/descriptions/*.yaml); with --description, '
                        'only its name in summary.json')
    p.add_argument('--benchmark', type=str, default=None, metavar='BENCHMARK',
                   help='CD-TG: look --class-name up in text/descriptions/BENCHMARK.yaml only (--descriptions FILE: '
                        'in that file)')
    p.add_argument('--description', type=str, default=None,
                   help='CD-TG: a one-off description of the class (one sentence), encoded on the fly')
    p.add_argument('--background-description', type=str, default=None,
                   help=f'CD-TG with --description: the background text (default "{GENERIC_BACKGROUND}")')
    add_runtime_args(p, img_size_help='default: the training image size', bsz_default=4,
                     bsz_help='queries per forward pass', seed_help='seeds any randomness of test-time adaptation',
                     workers=False)
    add_adaptation_args(p, 'query')
    add_plugin_args(p, 'test')
    return p


# --- inputs ---------------------------------------------------------------------------------------------------------
# --- text -----------------------------------------------------------------------------------------------------------
def find_class(name: str, benchmark: str | None, file: str | None = None) -> tuple[str, str]:
    r"""(benchmark, class name as written in its description file) for `--class-name`: in the description file
    `file` (the plug-in's --descriptions FILE) if given, else in text/descriptions/ (`benchmark`'s file only, if
    given)."""
    from text.descriptions import available_benchmarks, load_description_file, load_descriptions
    if file:
        desc = load_description_file(file)
        entry = desc.lookup(name)
        if entry is None:
            raise UserError(f'--class-name {name!r} is not described in --descriptions {file}')
        if benchmark and benchmark != desc.benchmark:
            raise UserError(f'--descriptions {file} describes benchmark {desc.benchmark!r}, not --benchmark '
                            f'{benchmark!r}')
        return desc.benchmark, entry.name
    candidates = [benchmark] if benchmark else available_benchmarks()
    hits = []
    for bench in candidates:
        entry = load_descriptions(bench).lookup(name)
        if entry is not None:
            hits.append((bench, entry.name))
    if not hits:
        where = f'text/descriptions/{benchmark}.yaml' if benchmark else 'any file of text/descriptions/'
        raise UserError(f'--class-name {name!r}: no description in {where}; pass --description "A photo of ..." '
                        'for a class that has none')
    if len(hits) > 1:
        raise UserError(f'--class-name {name!r} is described in several files ({", ".join(b for b, _ in hits)}); '
                        'pick one with --benchmark BENCHMARK')
    return hits[0]


def check_text_flags(args: argparse.Namespace) -> tuple[str, str] | None:
    r"""Check the text flags before any model is built; (benchmark, class) when --class-name names a described
    class (and no --description replaces its text)."""
    if args.description is not None and not args.description.strip():
        raise UserError('--description is empty')
    if args.background_description is not None:
        if args.description is None:
            raise UserError('--background-description goes with --description (a --class-name uses its file\'s '
                            'background)')
        if not args.background_description.strip():
            raise UserError('--background-description is empty')
    if args.class_name is not None and args.description is None:
        return find_class(args.class_name, args.benchmark, args.descriptions)
    return None


def bind_text(model, args: argparse.Namespace, described: tuple[str, str] | None) -> dict | None:
    r"""Give the plug-in (if any) the class's text; returns what summary.json records about it."""
    has_plugin = plugin_record(model) is not None
    wants_text = args.class_name is not None or args.description is not None
    if not has_plugin:
        if wants_text or args.benchmark or args.descriptions or args.background_description:
            raise UserError(f'{args.load} has no CD-TG plug-in, so it uses no text: drop --class-name / '
                            '--description / --benchmark / --descriptions / --background-description')
        return None
    if not wants_text:
        raise UserError(f'{args.load} carries the CD-TG plug-in, which needs the class\'s text: pass --class-name '
                        'NAME (from text/descriptions/) or --description "A photo of ..."')
    if args.description is not None:
        name = args.class_name or 'custom class'
        if args.background_description is not None:
            background = args.background_description
        elif args.benchmark:
            from text.descriptions import load_descriptions
            background = load_descriptions(args.benchmark).background_caption
        else:
            background = GENERIC_BACKGROUND
        model.hooks.bind_texts('predict', [name], [[args.description.strip()]], [background.strip()])
        return {'class_name': name, 'source': '--description', 'texts': [args.description.strip()],
                'background': [background.strip()]}
    benchmark, name = described
    model.hooks.bind(benchmark, [name])                 # the --descriptions FILE when it describes `benchmark`
    desc = model.hooks.descriptions_for(benchmark)
    return {'class_name': name, 'source': str(desc.path), 'texts': desc.texts(name),
            'background': [desc.background_caption] + desc.background_attributes}


# --- prediction -----------------------------------------------------------------------------------------------------
def full_size_mask(model, output: Output, size: tuple[int, int]) -> np.ndarray:
    r"""The binary mask of one query (output of batch 1) at its original size (H, W): the logits are resized
    bilinearly (as the methods upsample their own logits) and then segmented by the method's K-shot policy."""
    logits = output.logits.float()
    h, w = size
    per_pixel = logits[0].numel() // (logits.shape[-2] * logits.shape[-1])
    scale = min(1.0, (MAX_UPSAMPLED / max(per_pixel * h * w, 1)) ** 0.5)
    th, tw = max(1, int(h * scale + 1e-6)), max(1, int(w * scale + 1e-6))
    flat = logits.reshape(-1, 1, *logits.shape[-2:])
    up = F.interpolate(flat, (th, tw), mode='bilinear', align_corners=True).reshape(*logits.shape[:-2], th, tw)
    mask = model.segment(Output(up))[0]
    if (th, tw) != (h, w):
        mask = F.interpolate(mask[None, None].float(), (h, w), mode='nearest')[0, 0]
    return (mask > 0).cpu().numpy()


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    r"""The prediction in red (50 %) over the image."""
    rgb = np.asarray(image, dtype=np.float32)
    red = np.array([255.0, 30.0, 20.0], dtype=np.float32)
    out = np.where(mask[..., None], 0.5 * rgb + 0.5 * red, rgb)
    return Image.fromarray(np.rint(out).astype(np.uint8))


def main(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if not args.load:
        raise UserError('--load CHECKPOINT is required (a best.pt or last.pt written by train.py)')
    if Path(args.load).is_dir():
        raise UserError(f'--load {args.load} is a run folder; pass {Path(args.load) / "best.pt"}')
    if not args.out:
        raise UserError('--out DIR is required (the folder the masks, overlays and summary.json go to)')
    final = Path(args.out)
    specs = [split_support(s) for s in args.support]
    inputs = [('--load', args.load)] + [('--support', p) for pair in specs for p in pair]
    inputs += [('--support-dir', args.support_dir)] if args.support_dir else []
    inputs += [('--query', q) for q in args.query if Path(q).exists()]
    check_creatable_folder(final, '--out')
    check_apart_from_inputs(final, '--out', inputs)       # before any work: inputs are never written over
    if args.support_dir:
        specs += pair_support_dir(Path(args.support_dir))
    if not specs:
        raise UserError('no support: pass --support IMAGE:MASK (repeatable) or --support-dir DIR')
    for image, mask in specs:                   # every support is checked before the model is loaded
        read_support(image, mask)
    described = check_text_flags(args)
    exclude = {p.resolve() for pair in specs for p in pair}
    queries = collect_queries(args.query, exclude)
    with staged_folder(final, '--out', 'predict.py', replace=args.overwrite) as tmp:
        result = _predict(args, specs, queries, described, tmp)
    print(f'{len(queries)} masks -> {final / "masks"}, overlays -> {final / "overlays"}, summary -> '
          f'{final / "summary.json"}')
    return result


def _predict(args: argparse.Namespace, specs: list[tuple[Path, Path]], queries: list[Path],
             described: tuple[str, str] | None, out: Path) -> dict:
    device = resolve_device(args.device)
    configure_backends(device)
    model, ckpt = load_model(args.load, device, args)
    model.set_test_time(finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr)
    config = ckpt['config']
    size = args.img_size or config['img_size']
    supports = [load_support(image, mask, size) for image, mask in specs]
    degenerate = check_supports(supports, specs, size, args.strict_shots)
    text = bind_text(model, args, described)
    seed_everything(args.seed)
    start = time.perf_counter()
    adaptation = (f', test-time adaptation {model.adaptation.steps} steps at lr {model.adaptation.lr:g}'
                  if model.adaptation.steps else '')
    print(f'{config["method"]}{" + CD-TG" if text else ""} from {args.load}: {len(supports)}-shot, {len(queries)} '
          f'queries at {size}x{size}{adaptation}' + (f', class text from {text["source"]}' if text else ''))
    class_id = torch.zeros(1, dtype=torch.long, device=device)
    names = output_names(queries)
    masks, overlays = out / 'masks', out / 'overlays'
    masks.mkdir()
    overlays.mkdir()
    records = []
    with torch.no_grad():
        encoded = model.encode_supports(torch.stack([s['img'] for s in supports])[None].to(device),
                                        torch.stack([s['mask'] for s in supports])[None].to(device), class_id)
        for b in range(0, len(queries), args.bsz):
            batch = queries[b:b + args.bsz]
            images = [open_rgb(q, upright=True) for q in batch]
            x = torch.stack([image_tensor(img, size) for img in images]).to(device)
            output = model.infer(model.encode_query(x, encoded.select([0] * len(batch))))
            for i, (query, image) in enumerate(zip(batch, images)):
                mask = full_size_mask(model, Output(output.logits[i:i + 1]), (image.height, image.width))
                name = names[b + i]
                Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f'{name}.png')
                overlay(image, mask).save(overlays / f'{name}.jpg', quality=90)
                records.append({'image': str(query), 'size': [image.width, image.height],
                                'mask': f'masks/{name}.png', 'overlay': f'overlays/{name}.jpg',
                                'foreground_fraction': round(float(mask.mean()), 6)})
            print(f'  {min(b + args.bsz, len(queries))}/{len(queries)}')
    summary = {'checkpoint': str(args.load), 'method': config['method'], 'backbone': config['backbone'],
               'trained_on': config['benchmark'], 'img_size': size, 'nshot': len(supports),
               'plugin': plugin_record(model), 'text': text, 'test_time_adaptation': adaptation_record(model),
               'seed': args.seed, 'supports': [s['record'] for s in supports], 'degenerate_supports': degenerate,
               'queries': records,
               'seconds': round(time.perf_counter() - start, 3)}
    (out / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    return summary


if __name__ == '__main__':
    run_cli(main)
