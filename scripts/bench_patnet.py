r"""PATNet forward time: exact rank-2 closed form vs the reference pseudo-inverse transform, side by side.

    python scripts/bench_patnet.py                       # ResNet-50, 400x400, 1-shot, batch 1, all CPU cores
    python scripts/bench_patnet.py --shots 5 --device cuda

Both variants share one set of (random, no download) weights and the same inputs. Timings alternate between the
variants repetition by repetition (so load from other processes hits both alike). Prints both timings (medians),
the maximum absolute difference of the logits, and last a line `speed-up: X.XX`: the median over repetitions of
the paired ratio pinv / rank2 (each pair measured back to back, which is robust to bursts of load on a shared
machine; the ratio of the two medians is printed too).
"""
import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench  # noqa: E402  (scripts/bench.py: the shared fixed episode and timing helpers)
from common.config import bounded, parse_with_config  # noqa: E402
from common.constants import MIN_IMG_SIZE  # noqa: E402
from common.errors import run_cli  # noqa: E402
from common.utils import resolve_device  # noqa: E402
from model import BACKBONES, build_method  # noqa: E402
from model.layers import multilayer_correlation  # noqa: E402

PARTS = ('backbone', 'prototypes', 'transform', 'correlation', 'learner')


def episode(img_size: int, shots: int, batch: int, seed: int, device: torch.device):
    r"""The fixed random episode of scripts/bench.py, as the positional inputs of the pipeline."""
    ep = bench.episode(img_size, shots, batch, seed, device)
    return ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id']


def timed_parts(model, inputs, device: torch.device) -> dict:
    r"""One forward split into its parts: the pipeline's `encode` stage, then the steps of `PATNet.match`."""
    times, marks = {}, [time.perf_counter()]

    def mark(name):
        bench.sync(device)
        marks.append(time.perf_counter())
        times[name] = marks[-1] - marks[-2]
    bench.sync(device)
    marks[0] = time.perf_counter()
    record = model.encode(*inputs)
    ctx, query_feats, support_feats = record.ctx, record.query_feats, record.support_feats
    mark('backbone')
    fg, bg = model.prototypes(support_feats, ctx)
    mark('prototypes')
    query_maps, support_maps = model.transform_maps(query_feats, support_feats, fg, bg, ctx)
    mark('transform')
    corrs = multilayer_correlation(query_maps, support_maps, model.backbone.stage_ids)
    mark('correlation')
    model.learner(corrs)
    mark('learner')
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--backbone', default='resnet50', choices=BACKBONES)
    p.add_argument('--backbone-weights', default='none',
                   help='none (random; default, no download) | imagenet | PATH to a .pth file')
    bounded(p, '--img-size', int, 400, low=MIN_IMG_SIZE, high=4096)
    bounded(p, '--shots', int, 1, low=1)
    bounded(p, '--batch', int, 1, low=1)
    bounded(p, '--reps', int, 7, low=1, help='timed forwards per variant')
    bounded(p, '--warmup', int, 1, low=0, help='untimed forwards per variant first')
    bounded(p, '--threads', int, None, low=1, help='torch CPU threads (default: all cores available)')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--tf32', action='store_true', help='allow TF32 on CUDA (off by default: parity is checked)')
    p.add_argument('--breakdown', action='store_true',
                   help='also time backbone / prototypes / transform / correlation / learner separately')
    bounded(p, '--seed', int, 0, low=0)
    args = parse_with_config(p, argv)
    device = resolve_device(args.device)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')       # the random-backbone warning: known, this is a timing run
        rank2 = build_method('patnet', args.backbone, args.backbone_weights)
        pinv = build_method('patnet', args.backbone, None, transform='pinv')
    pinv.load_state_dict(rank2.state_dict())
    models = {'pinv': pinv.to(device).eval(), 'rank2': rank2.to(device).eval()}
    inputs = episode(args.img_size, args.shots, args.batch, args.seed, device)

    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {threads} threads'
    print(f'PATNet {args.backbone}, {args.img_size}x{args.img_size}, {args.shots}-shot, batch {args.batch}, '
          f'{where}, {args.warmup} warm-up + {args.reps} timed forwards per variant')
    outputs, times, cpu = {}, {name: [] for name in models}, {name: [] for name in models}
    def run(model):
        return model.infer(model.encode(*inputs)).logits     # the test-time entry point, as test.py
    with torch.no_grad():
        for name, model in models.items():
            for _ in range(args.warmup):
                outputs[name] = run(model)
        for _ in range(args.reps):
            for name, model in models.items():
                bench.sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[name] = run(model)
                bench.sync(device)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        parts = {name: [timed_parts(model, inputs, device) for _ in range(args.reps if args.breakdown else 0)]
                 for name, model in models.items()}
    diff = (outputs['pinv'] - outputs['rank2']).abs().max().item()
    scale = outputs['pinv'].abs().max().item()
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in models:
        print(f'{name:6s} forward: median {med[name] * 1e3:8.1f} ms  (min {min(times[name]) * 1e3:.1f}, '
              f'max {max(times[name]) * 1e3:.1f}; process CPU time median {statistics.median(cpu[name]) * 1e3:.1f} ms)')
    if args.breakdown:
        for name in models:
            print(f'{name:6s} parts (median ms): ' + ', '.join(
                f'{part} {statistics.median(t[part] for t in parts[name]) * 1e3:.1f}' for part in PARTS))
    print(f'max |logits(pinv) - logits(rank2)|: {diff:.3e}  (max |logits| {scale:.3e})')
    paired = statistics.median(a / b for a, b in zip(times['pinv'], times['rank2']))
    print(f'ratio of the medians: {med["pinv"] / med["rank2"]:.2f}')
    speedup = paired
    print(f'speed-up: {speedup:.2f}')
    return {'times': times, 'median': med, 'cpu_times': cpu, 'parts': parts, 'max_abs_diff': diff,
            'speedup': speedup}


if __name__ == '__main__':
    run_cli(main)
