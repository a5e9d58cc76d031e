r"""Float32 HSNet / PATNet logits against a float64 evaluation of the same network, before and after the accurate
channels-last GroupNorm of the learner (model/layers/learner.py).

    python scripts/check_precision.py                      # ResNet-50, 400x400, 1-shot, random weights (no download)
    python scripts/check_precision.py --shots 5 --backbone-weights imagenet

For each method: one seeded episode; the float32 model in eval mode with (a) PyTorch's channels-last group-norm
kernel ("before": one float32 pass over each group, as the learner ran until this check was written) and (b) the
learner's own GroupNormLast ("after"); the same weights cast to float64 give the reference. Prints, per method and
variant, the relative error ||l32 - l64|| / ||l64|| of the logits, their largest absolute error, the number of mask
pixels that differ from the float64 prediction, and the learner's forward time (median of --repeats runs,
alternating the two variants so that load from other processes hits both alike), and last, per method, a line
`learner after/before: X.XX`: the median of the paired ratios (each pair measured back to back, which is robust to
bursts of load on a shared machine).
"""
import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.errors import run_cli  # noqa: E402
from data.synthetic import elliptic_episode  # noqa: E402
from model import BACKBONES, build_method  # noqa: E402
from model.layers import learner as learner_module  # noqa: E402
from model.layers import mask_features, multilayer_correlation  # noqa: E402


def native_channels_last(self, x: torch.Tensor) -> torch.Tensor:
    r"""GroupNormLast as it was: PyTorch's channels-last kernel on the NHWC view [B,C,S,1] of x."""
    xl = x.movedim(1, -1)
    bsz, ch = x.shape[:2]
    img = xl.reshape(bsz, -1, 1, ch).permute(0, 3, 1, 2)
    y = F.group_norm(img, self.num_groups, self.weight, self.bias, self.eps)
    return y.permute(0, 2, 3, 1).reshape(xl.shape).movedim(-1, 1)


VARIANTS = {'before': native_channels_last, 'after': learner_module.GroupNormLast.forward}


def episode(img_size: int, shots: int, seed: int):
    r"""Random images and elliptic support masks (one fixed 1-query episode)."""
    ep = elliptic_episode(img_size, shots, seed=seed, query_mask=False)
    return ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id']


def use_variant(name: str) -> None:
    learner_module.GroupNormLast.forward = VARIANTS[name]


@torch.no_grad()
def learner_inputs(model, inputs):
    r"""The correlation pyramid the learner reads, for timing the learner alone."""
    record = model.encode(*inputs)
    if hasattr(model, 'transform_maps'):
        fg, bg = model.prototypes(record.support_feats, record.ctx)
        q, s = model.transform_maps(record.query_feats, record.support_feats, fg, bg, record.ctx)
        return multilayer_correlation(q, s, model.backbone.stage_ids)
    support = mask_features(record.support_feats, record.ctx.support_masks)
    return multilayer_correlation(record.query_feats, support, model.backbone.stage_ids)


@torch.no_grad()
def check(method: str, args) -> list[dict]:
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = build_method(method, args.backbone, args.backbone_weights).eval()
    inputs = episode(args.img_size, args.shots, args.seed)
    reference = copy.deepcopy(model).double()
    use_variant('after')       # (the float64 reference runs the same code; its group norms are exact enough)
    out64 = reference(*[t.double() if t.is_floating_point() else t for t in inputs])
    pred64 = reference.segment(out64)
    logits64 = out64.logits
    rows = []
    for name in VARIANTS:
        use_variant(name)
        out = model(*inputs)
        diff = out.logits.double() - logits64
        rows.append({'method': method, 'variant': name, 'rel': float(diff.norm() / logits64.norm()),
                     'max_abs': float(diff.abs().max()), 'flipped': int((model.segment(out) != pred64).sum())})
    corrs = learner_inputs(model, inputs)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            use_variant(name)
            start = time.perf_counter()
            model.learner(corrs)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times['after'], times['before']))
    for row in rows:
        row['learner_s'] = statistics.median(times[row['variant']])
        row['ratio'] = ratio
    use_variant('after')
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--methods', nargs='+', default=['hsnet', 'patnet'])
    p.add_argument('--backbone', default='resnet50', choices=BACKBONES)
    p.add_argument('--backbone-weights', default='none',
                   help='none (random; default, no download) | imagenet | PATH to a .pth file')
    p.add_argument('--img-size', type=int, default=400)
    p.add_argument('--shots', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--repeats', type=int, default=5, help='learner timings per variant')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f'{args.img_size}x{args.img_size}, {args.shots}-shot, backbone {args.backbone} ({args.backbone_weights}), '
          f'{torch.get_num_threads()} threads; error of the float32 logits against float64')
    for method in args.methods:
        for row in check(method, args):
            rows.append(row)
            print(f'{row["method"]:7s} {row["variant"]:6s}  rel {row["rel"]:.2e}  max abs {row["max_abs"]:.2e}  '
                  f'flipped pixels {row["flipped"]:5d}  learner {row["learner_s"]:.3f} s')
        print(f'{method:7s} learner after/before: {rows[-1]["ratio"]:.2f}')
    return rows


if __name__ == '__main__':
    run_cli(main)
