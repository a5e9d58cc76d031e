r"""Convert the CD-TG reference's released captions into description files of this project, so that a reproduction
can embed the paper's own text instead of the shipped descriptions.

    python scripts/import_captions.py --reference CD_TG/clip_prompts --out text/descriptions/reference
    python train.py ... --cdtg --descriptions text/descriptions/reference/pascal.yaml
    python test.py ... --benchmark isic --descriptions text/descriptions/reference/isic.yaml

`--reference` is the `clip_prompts/` folder of a checkout of github.com/Lilacis/CD_TG (not redistributed here). Its
files map to benchmarks as isic.json -> isic, lung.json -> lung, wbc.json -> wbc, chaost2.json -> chaos,
pascal.json -> pascal, coco.json -> coco; each holds `{"categories": [{"id", "name", "caption", ...}]}`. The
reference's plug-in embeds background.json's single caption as the background of every dataset, so that caption
becomes the background of every imported file (required). Class names are matched to this project's names through
the shipped description files (case, spaces, underscores and aliases: `seborrheic_keratosis`, `RK` = right kidney);
the reference name is kept as an alias. CHAOS's `BG` entry is not a class (and the plug-in never read it). coco.json
stores its text under `description`, which the released encoder never reads (it falls back to the bare class name);
the description is imported, with a note.

The files are `captions_only` (the reference has no attribute sentences, so they serve `--cdtg-attn paper`) and
record their provenance: the source file and its SHA-256, and that the text is the reference's (GPT-4 per the paper).
"""
import argparse
import hashlib
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, run_cli  # noqa: E402
from text.descriptions import (FileSource, class_record, load_descriptions, normalize_name,  # noqa: E402
                               write_description_file)

REFERENCE_FILES = {'isic.json': 'isic', 'lung.json': 'lung', 'wbc.json': 'wbc', 'chaost2.json': 'chaos',
                   'pascal.json': 'pascal', 'coco.json': 'coco'}
BACKGROUND_FILE = 'background.json'
BACKGROUND_NAMES = ('bg', 'background')


def read_categories(path: Path) -> list[dict]:
    r"""The `categories` list of a reference caption file; every problem is a UserError naming the file."""
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f'cannot read reference caption file {path}: {err}') from err
    cats = data.get('categories') if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) and 'name' in c for c in cats):
        raise UserError(f'{path}: expected {{"categories": [{{"id": ..., "name": ..., "caption": ...}}, ...]}} as in '
                        'the CD-TG clip_prompts files')
    return cats


def category_text(cat: dict, path: Path, notes: list[str]) -> str:
    r"""The caption of one category (or its `description`, with a note: the released encoder reads only `caption`)."""
    for key in ('caption', 'description'):
        text = cat.get(key)
        if isinstance(text, str) and text.strip():
            if key == 'description':
                notes.append(f'{path.name}: {cat["name"]!r} has no `caption`; imported its `description` (the released '
                             'encoder would have embedded the bare class name)')
            return ' '.join(text.split())
    raise UserError(f'{path}: category {cat.get("name")!r} has neither a caption nor a description')


def import_file(path: Path, benchmark: str, background: str, background_sha: str, out: Path) -> tuple[Path, list]:
    r"""Write `out/<benchmark>.yaml` from one reference caption file. Returns the path and notes."""
    notes: list[str] = []
    shipped = load_descriptions(benchmark)
    records, seen = [], set()
    for cat in read_categories(path):
        ref_name = str(cat['name'])
        if normalize_name(ref_name) in BACKGROUND_NAMES:
            notes.append(f'{path.name}: {ref_name!r} is the background, not a class (the plug-in uses '
                         f'{BACKGROUND_FILE} for every dataset); skipped')
            continue
        ours = shipped.lookup(ref_name)
        name = ours.name if ours is not None else ref_name
        if ours is None:
            notes.append(f'{path.name}: class {ref_name!r} is not a class of the shipped {benchmark} descriptions; '
                         'kept under its reference name')
        if normalize_name(name) in seen:
            raise UserError(f'{path}: class {ref_name!r} appears twice')
        seen.add(normalize_name(name))
        aliases = [ref_name] if normalize_name(ref_name) != normalize_name(name) else []
        records.append(class_record(name, category_text(cat, path, notes), None, aliases))
    source_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    provenance = {
        'author': 'the CD-TG authors (Lilacis/CD_TG, clip_prompts/), imported unchanged',
        'model': 'GPT-4, according to the CD-TG paper (the caption files do not say)',
        'method': f'scripts/import_captions.py from {path.name} (one caption per class, no attribute sentences) and '
                  f'{BACKGROUND_FILE} (the background of every dataset in the reference plug-in)',
        'template': "the paper's Text Generation Unit: 'Characterize ($class name$) in the dataset', standardised "
                    "to 'A photo of <class> in which ...'",
        'date': date.today().isoformat(),
        'source_sha256': source_sha,
        'background_sha256': background_sha,
    }
    header = (f"Reference captions of the CD-TG release for '{benchmark}', converted by scripts/import_captions.py.\n"
              'Use with --descriptions (and --cdtg-attn paper: captions only). Not redistributed with this project.')
    target = out / f'{benchmark}.yaml'
    write_description_file(target, FileSource(benchmark, shipped.modality, provenance), {'caption': background},
                           records, header=header, captions_only=True)
    return target, notes


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--reference', required=True, help="the reference's clip_prompts/ folder")
    p.add_argument('--out', required=True, help='folder for the description files (<benchmark>.yaml)')
    p.add_argument('--force', action='store_true', help='overwrite existing files')
    args = p.parse_args(argv)
    folder, out = Path(args.reference), Path(args.out)
    if not folder.is_dir():
        raise UserError(f'--reference {folder}: no such folder (expected the clip_prompts/ folder of Lilacis/CD_TG)')
    found = {name: bench for name, bench in REFERENCE_FILES.items() if (folder / name).is_file()}
    if not found:
        raise UserError(f'{folder} holds none of {", ".join(REFERENCE_FILES)} (the CD-TG clip_prompts files)')
    bg_path = folder / BACKGROUND_FILE
    if not bg_path.is_file():
        raise UserError(f'{bg_path} is missing: the reference embeds its caption as the background of every dataset')
    bg_cats = read_categories(bg_path)
    background = category_text(bg_cats[0], bg_path, [])
    bg_sha = hashlib.sha256(bg_path.read_bytes()).hexdigest()
    existing = [out / f'{b}.yaml' for b in found.values() if (out / f'{b}.yaml').exists()]
    if existing and not args.force:
        raise UserError(f'{", ".join(map(str, existing))} exist; pass --force to overwrite')
    written = []
    for name, bench in found.items():
        target, notes = import_file(folder / name, bench, background, bg_sha, out)
        for note in notes:
            print(f'note: {note}')
        print(f'{folder / name} -> {target}')
        written.append(target)
    return written


if __name__ == '__main__':
    run_cli(main)
