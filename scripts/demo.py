r"""Offline demo: train HSNet on `synthetic` (natural-like source), test on `synthetic-med` (medical-like target).

    python scripts/demo.py

Runs on a 2-core CPU in about 4 minutes with no downloads. ImageNet weights are not available offline, so the
frozen ResNet-50 is randomly initialised and its BatchNorm statistics are re-estimated on 256 *source* training
images (`--bn-calibration 256`): the smallest honest fix that lets a random frozen backbone carry the demo (without
it, deep random features make every pixel look alike; see README). The untrained baseline is the same model with
the learner at its random initialisation. Prints both synthetic-med scores and writes a PNG of predictions.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import test as test_cli  # noqa: E402
import train as train_cli  # noqa: E402
from common.config import bounded, parse_with_config  # noqa: E402
from common.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from common.errors import run_cli  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.factory import build_model  # noqa: E402


def reset_learnable(ckpt: dict, seed: int) -> dict:
    r"""The weights of a trained checkpoint with every learnable tensor back at a fresh random initialisation."""
    torch.manual_seed(seed)
    fresh = build_model(ModelConfig.from_saved(ckpt['config'], ckpt.get('plugin')), None)
    learnable = {name for name, p in fresh.named_parameters() if p.requires_grad}
    init = fresh.state_dict()
    return {k: (init[k] if k in learnable else v) for k, v in ckpt['model'].items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--datapath', default='datasets', help='where the synthetic benchmarks are generated')
    p.add_argument('--logpath', default='logs/demo')
    p.add_argument('--device', default='auto')
    bounded(p, '--epochs', int, 2, low=1)
    bounded(p, '--episodes-per-epoch', int, 1000, low=1)
    bounded(p, '--test-episodes', int, 200, low=1)
    args = parse_with_config(p, argv)
    logpath = Path(args.logpath)
    run = logpath / 'train'
    if (run / 'last.pt').exists():
        raise SystemExit(f'{run} already holds a demo run; remove {logpath} or pass another --logpath')
    common = ['--datapath', args.datapath, '--device', args.device, '--workers', '1', '--seed', '0']
    train_cli.main(['--method', 'hsnet', '--benchmark', 'synthetic', '--backbone', 'resnet50',
                    '--backbone-weights', 'none', '--bn-calibration', '256', '--img-size', '96', '--bsz', '8',
                    '--lr', '1e-3', '--epochs', str(args.epochs), '--episodes-per-epoch', str(args.episodes_per_epoch),
                    '--val-episodes', '96', '--logpath', str(run)] + common)

    ckpt = load_checkpoint(run / 'best.pt')
    untrained = dict(ckpt, model=reset_learnable(ckpt, seed=1), epoch=-1)
    save_checkpoint(untrained, run / 'untrained.pt')

    test_args = ['--benchmark', 'synthetic-med', '--nshot', '1', '--episodes', str(args.test_episodes),
                 '--bsz', '8'] + common
    print('\n== untrained (learner at random init) on synthetic-med, 1-shot ==')
    before = test_cli.main(['--load', str(run / 'untrained.pt'), '--logpath', str(logpath / 'test-untrained')]
                           + test_args)
    print('\n== trained on synthetic, tested on synthetic-med, 1-shot ==')
    after = test_cli.main(['--load', str(run / 'best.pt'), '--logpath', str(logpath / 'test-trained'), '--vis', '6']
                          + test_args)
    print(f'\nsynthetic-med 1-shot mIoU: untrained {before["miou"]:.2f} -> trained {after["miou"]:.2f}')
    print(f'figure: {logpath / "test-trained" / "predictions.png"}')
    return {'untrained': before, 'trained': after}


if __name__ == '__main__':
    run_cli(main)
