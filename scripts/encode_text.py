r"""Precompute the frozen CLIP text embeddings of a benchmark's descriptions into the embedding cache.

    python scripts/encode_text.py --benchmark isic --clip ViT-B-32 --clip-weights openai
    python scripts/encode_text.py --benchmark fss --datapath DATA      # classes taken from the dataset

Embeds every caption and attribute sentence of text/descriptions/<benchmark>.yaml (or of the dataset's classes,
with --datapath) plus the domain's background, keyed by encoder identity and exact text, so that train.py and
test.py with --cdtg never run CLIP for these texts again. Prints how many texts were new and how many cached.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import bounded, parse_with_config  # noqa: E402
from common.errors import run_cli  # noqa: E402
from text.descriptions import load_descriptions  # noqa: E402
from text.encoder import CLIP_MODELS, TextBank  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--benchmark', required=True, help='a benchmark with a file in text/descriptions/')
    p.add_argument('--clip', default='ViT-B-32', choices=CLIP_MODELS)
    p.add_argument('--clip-weights', default='openai', help='openai or hub (the published weights) | none | PATH to a '
                   'local copy of the weights (docs/cdtg.md, "Text encoders")')
    p.add_argument('--text-cache', default=None, help='cache folder (default ~/.cache/cdtg/text-embeddings)')
    p.add_argument('--datapath', default=None,
                   help='take the class list from the dataset under DATA (needed for fss, whose 1000 classes use '
                        'generic captions) instead of the description file')
    bounded(p, '--seed', int, 0, low=0, help='seed of a random (--clip-weights none) text encoder')
    args = parse_with_config(p, argv)
    desc = load_descriptions(args.benchmark)
    if args.datapath:
        from data import build_dataset, dataset_class
        split = 'test' if 'test' in dataset_class(args.benchmark).splits else 'val'
        names = build_dataset(args.benchmark, args.datapath, split, 1, 32).class_names
    else:
        names = desc.class_names
    texts = [t for c in desc.for_classes(names) for t in c.texts]
    texts += [desc.background_caption] + list(desc.background_attributes)
    texts = list(dict.fromkeys(texts))
    bank = TextBank(args.clip, args.clip_weights, args.text_cache, args.seed)
    bank.embed(texts)
    print(f'{args.benchmark}: {len(texts)} texts for {len(names)} classes + background with {bank.identity}: '
          f'{bank.encoded} encoded, {len(texts) - bank.encoded} already cached -> {bank.cache.path}')
    return {'texts': len(texts), 'encoded': bank.encoded, 'cache': str(bank.cache.path)}


if __name__ == '__main__':
    run_cli(main)
