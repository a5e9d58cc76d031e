r"""Evaluate a checkpoint on a benchmark with a fixed, seeded episode list.

    python test.py --load logs/hsnet/best.pt --benchmark isic --datapath DATA --nshot 1

Prints `mIoU: xx.xx  FB-IoU: xx.xx  Dice: xx.xx` and writes results.json (scores, per-class IoU, seed and the
episode list) into --logpath.
"""
import argparse

from common.config import bounded, parse_with_config
from common.errors import run_cli
from common.names import MATCH_SHOTS, MIOU_OVER, PROTOCOLS, SUPPORT_RULES
from data import add_dataset_args, benchmarks_with_protocol
from engine.flags import add_adaptation_args, add_config_arg, add_plugin_args, add_runtime_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Test a trained few-shot segmenter on a benchmark.')
    add_config_arg(p)
    p.add_argument('--load', type=str, required=False, default=None, help='checkpoint (best.pt / last.pt)')
    p.add_argument('--benchmark', type=str, default='synthetic-med')
    p.add_argument('--datapath', type=str, default='datasets')
    add_dataset_args(p)
    bounded(p, '--nshot', int, 1, low=1)
    p.add_argument('--strict-shots', action='store_true',
                   help='refuse episodes whose K supports cannot be distinct (a class with K images or fewer); by '
                        'default such supports repeat, with a warning, and results.json counts them')
    p.add_argument('--protocol', type=str, default='2d', choices=tuple(PROTOCOLS),
                   help='2d: pre-sampled 2D episodes (every benchmark); volumetric: Q-Net\'s 5-fold protocol with '
                        f'3D Dice per organ ({", ".join(benchmarks_with_protocol("volumetric"))}; see '
                        'engine/volumetric.py)')
    p.add_argument('--volumetric-support', type=str, default=None, choices=SUPPORT_RULES,
                   help='support volume of each fold in the volumetric protocol: qnet (default; Q-Net\'s supp_idx 2) '
                        'or ssl-alpnet (the fold\'s extra fifth scan, SSL-ALPNet\'s SUPP_ID [4])')
    bounded(p, '--episodes', int, None, low=1,
            help='number of pre-sampled test episodes (2d protocol; default 600, or what the benchmark\'s protocol '
                 'fixes)')
    p.add_argument('--miou-over', type=str, default='all', choices=MIOU_OVER,
                   help='all (default, as HSNet/PATNet): mIoU and Dice average over every class of the split, a class '
                        'without episodes counting 0; seen: over the classes that had episodes')
    add_runtime_args(p, img_size_help='default: the training image size', bsz_default=1,
                     bsz_help='episodes per forward pass', seed_help='seeds the episode list (saved with the results)',
                     precision_help='fp32 (default), or bf16/fp16 autocast (faster on GPUs; see docs/gpus.md)')
    p.add_argument('--logpath', type=str, default=None,
                   help='output folder (default: <checkpoint folder>/test-<benchmark>-<K>shot-seed<seed>)')
    bounded(p, '--vis', int, 0, low=0, high=100, help='draw the first N episodes into predictions.png')
    add_adaptation_args(p, 'episode')
    p.add_argument('--tf32', action='store_true',
                   help='allow TF32 matmuls/convolutions on CUDA (faster; ~1e-3 relative error in the correlations). '
                        'Off by default, so evaluation matches float32 reference code')
    bounded(p, '--cache-images', int, 0, low=0,
            help='keep up to this many decoded and resized (image, mask) pairs of the episode list in memory shared '
                 'by the loader processes (0 = off; 640 KB each at 400x400): a target test set of a few hundred '
                 'images is then decoded once in total, not once per episode and worker')
    p.add_argument('--match-shots', type=str, default='auto', choices=MATCH_SHOTS,
                   help="K-shot 'vote' methods: match the shots one at a time after the single backbone pass (one: "
                        'same predictions, about half the peak memory), all at once (all), or auto (one on CPU, all '
                        'on CUDA)')
    add_plugin_args(p, 'test')
    return p


def main(argv=None) -> dict:
    r"""Parse the flags (torch is not imported yet, so -h and flag errors answer at once), then evaluate
    (engine/testing.py)."""
    args = parse_with_config(build_parser(), argv)
    from engine.testing import run
    return run(args)


if __name__ == '__main__':
    run_cli(main)
