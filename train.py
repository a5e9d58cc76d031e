r"""Episodic training on a source benchmark; checkpoints are selected on a held-out source-side split.

    python train.py --method hsnet --benchmark pascal --datapath DATA --backbone resnet50 --logpath logs/hsnet
"""
import argparse

from common.config import bounded, parse_with_config, typed_flags
from common.errors import run_cli
from common.names import AUGMENTATIONS, BOUNDARY_POLICIES, SCHEDULES
from data import add_dataset_args
from engine.flags import add_config_arg, add_method_args, add_plugin_args, add_runtime_args, preparse_method
from model import BACKBONES, METHODS, train_recipe


def build_parser(method: str = 'hsnet') -> argparse.ArgumentParser:
    r"""train.py's flags; those of `method`'s own options are added (`train.py --method patnet -h` lists them)."""
    p = argparse.ArgumentParser(description='Train a few-shot segmentation method on a source benchmark.')
    add_config_arg(p)
    p.add_argument('--method', type=str, default='hsnet', choices=sorted(METHODS))
    p.add_argument('--benchmark', type=str, default='pascal', help='source benchmark: pascal | coco | synthetic')
    p.add_argument('--val-benchmark', type=str, default=None,
                   help='source-side benchmark for model selection (default: the val split of --benchmark)')
    p.add_argument('--datapath', type=str, default='datasets', help='folder holding the benchmarks')
    add_dataset_args(p)
    p.add_argument('--backbone', type=str, default=None, choices=BACKBONES,
                   help="default: the method's (resnet50 for hsnet and patnet)")
    p.add_argument('--backbone-weights', type=str, default='imagenet',
                   help="imagenet (default) | deeplabv3-coco (torchvision's DeepLabv3 trunk trained on COCO: Q-Net's "
                        'initialisation; resnet50/resnet101) | none | PATH to a .pth file')
    bounded(p, '--bn-calibration', int, 0, low=0,
            help="re-estimate the frozen backbone's BatchNorm statistics on this many source training images before "
                 'training (0 = off). Makes --backbone-weights none usable (see README, demo)')
    one, kshot = (train_recipe(method, k) if method in METHODS else {} for k in (1, 2))

    def method_default(key: str) -> str:
        value = one.get(key) if one.get(key) == kshot.get(key) else f'{one.get(key)} (1-shot), {kshot.get(key)} (K > 1)'
        return f"default: the method's, {value} for {method}"

    add_runtime_args(p, img_size_help=method_default('img_size'), bsz_default=None, bsz_help=method_default('bsz'),
                     seed_help='seeds the run: episodes, augmentation, initialisation (saved with the run)',
                     precision_help='fp32 (default), bf16 or fp16 (autocast; fp16 with a gradient scaler); see '
                                    'docs/gpus.md')
    bounded(p, '--lr', float, None, low=0, low_open=True,
            help="base learning rate of the method's recipe (default: the method's, 1e-3 for hsnet and patnet; "
                 'optimizer, schedule and parameter groups come from the method)')
    bounded(p, '--epochs', int, None, low=1, help=method_default('epochs'))
    p.add_argument('--augmentation', type=str, default=None, choices=sorted(AUGMENTATIONS),
                   help="training images: none (resized only), flip-resized-crop (PMMs' flip + random resized crop "
                        "of 50-100 %% of the area) or gamma-affine-elastic (Q-Net's gamma, affine and elastic "
                        f'transforms on the query or the supports); {method_default("augmentation")}')
    bounded(p, '--episodes-per-epoch', int, None, low=1,
            help='training episodes per epoch (default: one per (image, class) pair of the training split)')
    bounded(p, '--val-episodes', int, 1000, low=1, help='fixed, seeded validation episodes')
    bounded(p, '--nshot', int, 1, low=1)
    p.add_argument('--train-boundary', type=str, default=None, choices=BOUNDARY_POLICIES,
                   help='label-255 pixels of the training query masks (PASCAL\'s object boundaries): background '
                        "(HSNet/PATNet/PMMs train them as background) or ignore (left out of the loss; Q-Net's NLL); "
                        f"{method_default('train_boundary')}. Evaluation always ignores them")
    _add_run_folder_args(p)
    if method in METHODS:
        add_method_args(p, method)
    add_plugin_args(p, 'train')
    return p


def _add_run_folder_args(p: argparse.ArgumentParser) -> None:
    r"""The run folder and what goes into it: checkpoints, logs, TensorBoard, the non-finite policy, the schedule."""
    p.add_argument('--logpath', type=str, default=None, help='run folder (default: logs/<method>-<benchmark>-<time>)')
    p.add_argument('--resume', action='store_true', help='continue the run in --logpath from its last.pt')
    bounded(p, '--log-every', int, 50, low=1,
            help='training steps between loss scalars and health readings (log.txt, health.json)')
    bounded(p, '--save-every-steps', int, 0, low=0,
            help='also write last.pt every N training steps within an epoch (0 = at epoch ends only); --resume '
                 'continues from the exact step')
    bounded(p, '--tb-images', int, 4, low=0, high=32,
            help='draw the first N (fixed) validation episodes into TensorBoard every epoch (0 = off)')
    bounded(p, '--skip-nonfinite', int, 0, low=0,
            help='skip up to N training steps whose loss or gradient is NaN/inf, with a warning (default 0: stop '
                 'at the first one)')
    p.add_argument('--lr-schedule', type=str, default='method', choices=SCHEDULES,
                   help="method (default): the method's own schedule (constant for hsnet/patnet); none | cosine | "
                        'poly replace it (per step, over the whole run)')
    bounded(p, '--warmup-steps', int, 0, low=0, help='linear learning-rate warm-up steps (with --lr-schedule '
                                                      'none|cosine|poly)')
    bounded(p, '--grad-clip', float, None, low=0, low_open=True,
            help="clip the gradient norm to this value (default: the method's recipe; none for hsnet/patnet)")


def main(argv=None) -> dict:
    r"""Parse the flags (torch is not imported yet, so -h and flag errors answer at once), then run the training
    (engine/training.py)."""
    parser = build_parser(preparse_method(argv))
    args = parse_with_config(parser, argv)
    typed = typed_flags(parser, argv)
    from engine.training import run
    return run(args, parser, typed)


if __name__ == '__main__':
    run_cli(main)
