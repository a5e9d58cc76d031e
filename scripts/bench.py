r"""Speed and memory of every method (and CD-TG) on fixed synthetic episodes: random weights, no download, no data.

    python scripts/bench.py                                   # every method, +-CD-TG, 1/5-shot, 400x400, CPU
    python scripts/bench.py --device cuda --precision bf16    # on a GPU
    python scripts/bench.py --methods hsnet patnet --compare-reference
    python scripts/bench.py --methods hsnet --cdtg off --shots 5 --reference-code hsnet   # a juhongm999/hsnet clone
    python scripts/bench.py --loader isic --datapath DATA     # data loading alone (episodes/s)
    python scripts/bench.py --loader isic --datapath DATA --workers 2 --loader-episodes 600 --cache-images 2000
    python scripts/bench.py --quick                           # tiny sizes, one repetition: a smoke run

For each method x CD-TG x K it reports test episodes/s (the test-time entry point, batch 1, as test.py), training
steps/s (1-shot, `--train-bsz` episodes per step, forward + backward + optimizer step), the peak memory of a test
episode and the growth during training (CUDA: `max_memory_allocated`; CPU: the peak resident set size, by default
of a fresh process that runs only that configuration, `--memory isolated`), and the CD-TG overhead relative to the
same method without it, two ways: the difference of the episode times (a method's configurations with and without
CD-TG are timed alternately, episode by episode, so that a change in the machine's load does not pass for an
overhead; what is left is a few percent of run-to-run noise) and the time spent inside the plug-in's hooks during the
same episodes ("hooks", relative to the plain episode: the plug-in's own cost, without that noise).

`--compare-reference` adds the reference formulations that live in the project, measured in the same process with
the same weights: PATNet's SVD pseudo-inverse transform (`--transform pinv`) and, for the K-shot vote methods, the
reference's K-shot formulation built from this project's layers: a full forward per shot (the query encoded again
each time), then the vote, with HSNet's correlation over every support pixel as the reference computes it (also
shown with this project's correlation, which skips the masked-out pixels on CPU). `--reference-code DIR` times the
public HSNet code itself (juhongm999/hsnet) with the same weights and checks that it predicts the same mask. Writes
the table to stdout and everything to `--json`.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.config import bounded, parse_with_config  # noqa: E402
from common.constants import MIN_IMG_SIZE  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.utils import resolve_device  # noqa: E402
from data.synthetic import elliptic_episode  # noqa: E402
from engine.factory import build_model  # noqa: E402
from engine.loops import PRECISIONS, autocast  # noqa: E402
from model import METHODS, Output  # noqa: E402


class PeakMemory:
    r"""Peak memory of a code region: the CUDA allocator's peak, or on CPU the process's peak resident set size
    (Linux: the kernel's high-water mark VmHWM, reset at the start of the region through /proc/self/clear_refs;
    elsewhere the resident size sampled every 2 ms). `total_mb` is the peak, `mb` the peak minus what the process
    held when the region began."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self.peak = _rss()
        self._exact = _reset_high_water_mark()
        if not self._exact:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._exact:
            self.peak = max(_high_water_mark(), _rss())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.mb = (self.peak - self.base) / 2**20
        self.total_mb = self.peak / 2**20


def _rss() -> int:
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:                                       # not Linux: the process's peak so far
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_high_water_mark() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')                                  # resets VmHWM to the current resident size
        return _high_water_mark() > 0
    except OSError:
        return False


def _high_water_mark() -> int:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def episode(size: int, shots: int, batch: int, seed: int, device: torch.device):
    r"""Random images and elliptic masks (one fixed episode per configuration), on `device`."""
    return {k: v.to(device) for k, v in elliptic_episode(size, shots, batch, seed).items()}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


class HookClock:
    r"""Time spent inside a model's plug-in hooks (`Hooks.query_features`, `support_features`, `prototypes`: every
    place a plug-in computes), per call of the wrapped episode runner: the plug-in's own cost, measured in the same
    episodes as the A/B difference and free of its run-to-run noise. On CUDA each hook call is synchronised."""

    HOOKS = ('query_features', 'support_features', 'prototypes')

    def __init__(self, hooks, device: torch.device):
        self.hooks, self.device, self.total, self.episodes = hooks, device, 0.0, []
        for name in self.HOOKS:
            setattr(hooks, name, self._timed(getattr(hooks, name)))

    def _timed(self, fn):
        def run(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.total += time.perf_counter() - start
            return out
        return run

    def runner(self, run):
        r"""`run`, also recording the hook time of each call in `episodes`."""
        def timed_run():
            before = self.total
            out = run()
            self.episodes.append(self.total - before)
            return out
        return timed_run

    def remove(self):
        for name in self.HOOKS:
            delattr(self.hooks, name)


def build(method: str, cdtg: bool, device: torch.device, **options):
    config = {'method': method, 'backbone': None, 'method_options': options}
    if cdtg:
        config.update(cdtg=True, clip='ViT-B-32', clip_weights='none', cdtg_attn='paper', alpha=0.7, fusion='fixed',
                      no_style_aug=False, text_lora=0, seed=0, cdtg_text_bias='bounded')
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = build_model(config, 'none').to(device).eval()
        model.hooks.bind('synthetic-med', ['skin lesion', 'cell nucleus', 'cell cytoplasm', 'lung'])
    return model


def episode_runner(model, ep, precision, device):
    def run():
        with torch.no_grad(), autocast(device, precision):
            return model.infer_episode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    return run


def reference_kshot(model, ep, precision, device, dense: bool = True):
    r"""The reference's K-shot: a whole forward (query encoded again) per shot, then HSNet's vote. With `dense`, a
    method that has the choice (`dense_correlation`: HSNet) correlates every support pixel, as the reference code."""
    def run():
        saved = getattr(model, 'dense_correlation', None)
        if saved is not None:
            model.dense_correlation = dense
        try:
            with torch.no_grad(), autocast(device, precision):
                logits = [model.infer(model.encode(ep['query_img'], ep['support_imgs'][:, k:k + 1],
                                                   ep['support_masks'][:, k:k + 1], ep['class_id'])).logits
                          for k in range(ep['support_imgs'].shape[1])]
                return model.segment(Output(torch.cat(logits, dim=1)))
        finally:
            if saved is not None:
                model.dense_correlation = saved
    return run


def train_step(model, ep, precision, device):
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-5)

    def run():
        model.train()
        with autocast(device, precision):
            out = model(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
            loss = sum(model.loss(out, ep).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
    return run


def profile_episode(model, ep, args, device) -> dict:
    r"""One test episode under torch.profiler (after a warm-up one): its `args.profile` costliest operators by self
    time, the calls of PyTorch's slow reference convolution, and the share of the episode spent in the backbone."""
    from torch.profiler import ProfilerActivity, profile, record_function
    run = episode_runner(model, ep, args.precision, device)
    run()
    backbone = model.backbone

    def forward(*a, **k):
        with record_function('backbone'):
            return type(backbone).forward(backbone, *a, **k)
    backbone.forward = forward
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    try:
        with warnings.catch_warnings(), profile(activities=activities) as prof:
            warnings.simplefilter('ignore')
            run()
            sync(device)
    finally:
        del backbone.forward
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_key = {e.key: e for e in events}
    top = sorted((e for e in events if e.key != 'backbone'), key=lambda e: -e.self_cpu_time_total)[:args.profile]
    return {'profile_ms': total / 1000,
            'backbone_share': by_key['backbone'].cpu_time_total / total if 'backbone' in by_key and total else None,
            'slow_conv2d_calls': by_key['aten::_slow_conv2d_forward'].count
            if 'aten::_slow_conv2d_forward' in by_key else 0,
            'profile_top': [(e.key, e.count, e.self_cpu_time_total / 1000) for e in top]}


def _profile_lines(row: dict) -> str:
    share = f'{100 * row["backbone_share"]:.1f}%' if row['backbone_share'] is not None else '-'
    lines = [f'  profile of one {row["method"]} episode ({row["cdtg"]}, {row["shots"]}-shot): '
             f'{row["profile_ms"]:.0f} ms of operators, backbone {share}, _slow_conv2d_forward calls: '
             f'{row["slow_conv2d_calls"]}']
    lines += [f'    {ms:9.1f} ms {100 * ms / row["profile_ms"]:5.1f}%  {calls:5d}x {name}'
              for name, calls, ms in row['profile_top']]
    return '\n'.join(lines)


def interleaved(runners: dict, device, reps: int, warmup: int) -> dict[str, list[float]]:
    r"""Time several configurations of one episode alternately (ABAB..., then BABA..., rep by rep), so that a change
    in the machine's load during the run hits them alike; returns each one's times."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name] += timed(runners[name], device, 1, 0)
    return times


def bench_models(args, device) -> list[dict]:
    rows = []
    for method in args.methods:
        models = {cdtg: build(method, cdtg == 'on', device) for cdtg in args.cdtg}
        for shots in args.shots:
            ep = episode(args.img_size, shots, 1, args.seed, device)
            runners = {c: episode_runner(m, ep, args.precision, device) for c, m in models.items()}
            clock = HookClock(models['on'].hooks, device) if 'on' in models else None
            if clock:
                runners['on'] = clock.runner(runners['on'])
            times = interleaved(runners, device, args.reps, args.warmup)
            if clock:
                clock.remove()
            for cdtg, model in models.items():
                row = {'method': method, 'cdtg': cdtg, 'shots': shots, 'test_s': statistics.median(times[cdtg]),
                       'test_times': times[cdtg]}
                if cdtg == 'on':
                    row['hooks_times'] = clock.episodes[args.warmup:]
                    row['hooks_s'] = statistics.median(row['hooks_times'])
                row.update(test_memory(args, method, cdtg, model, ep, device))
                t_train = []
                if shots == args.shots[0]:
                    train_ep = episode(args.img_size, 1, args.train_bsz, args.seed, device)
                    with PeakMemory(device) as mem_train:
                        t_train = timed(train_step(model, train_ep, args.precision, device), device,
                                        args.train_reps, min(args.warmup, 1))
                row['train_s'] = statistics.median(t_train) if t_train else None
                row['train_peak_mb'] = mem_train.mb if t_train else None
                if t_train and args.compare_reference and hasattr(model, 'dense_correlation'):
                    row.update(compare_dense_training(model, train_ep, args, device))
                if args.compare_reference and model.kshot == 'vote' and shots > 1:
                    row.update(compare_kshot(model, ep, args, device))
                if args.compare_reference and method == 'patnet':
                    pinv = build(method, cdtg == 'on', device, transform='pinv')
                    pinv.load_state_dict(model.state_dict())
                    row['pinv_s'] = statistics.median(timed(episode_runner(pinv, ep, args.precision, device), device,
                                                            args.reps, 0))
                    del pinv
                if args.reference_code and method == 'hsnet' and cdtg == 'off':
                    row.update(compare_public_hsnet(model, ep, args, device))
                if args.profile:
                    row.update(profile_episode(model, ep, args, device))
                rows.append(row)
                print(_line(row, rows), flush=True)
                if args.profile:
                    print(_profile_lines(row), flush=True)
        del models
    return rows


def compare_dense_training(model, ep, args, device) -> dict:
    r"""The training step with the reference's correlation over every support pixel (`dense_correlation`), timed
    alternately with ours (the same weights; each step updates them, alike for both)."""
    step = train_step(model, ep, args.precision, device)

    def dense():
        model.dense_correlation = True
        try:
            step()
        finally:
            model.dense_correlation = False
    times = interleaved({'ours': step, 'dense': dense}, device, args.train_reps, 1)
    return {'train_pair_s': statistics.median(times['ours']), 'train_dense_s': statistics.median(times['dense'])}


def test_memory(args, method: str, cdtg: str, model, ep, device) -> dict:
    r"""Peak memory of one test episode: in a fresh process (`--memory isolated`: the figure a user running only
    this configuration sees, comparable with another program's peak) or in this one (`inline`)."""
    if args.memory == 'isolated':
        return {'memory': 'isolated', **isolated_peak(args, (method, cdtg), ep['support_imgs'].shape[1])}
    with PeakMemory(device) as mem:
        episode_runner(model, ep, args.precision, device)()
    return {'memory': 'inline', 'test_peak_mb': mem.mb, 'test_peak_total_mb': mem.total_mb}


def isolated_peak(args, key: tuple[str, str], shots: int, public: str | None = None) -> dict:
    r"""Run one test episode of (method, cdtg) in a fresh process with this run's settings (`--peak-of`) and return
    its peak memory: the process's peak during the episode, and that minus what it held before the episode."""
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), '--peak-of', key[0], key[1], str(shots),
           '--img-size', str(args.img_size), '--precision', args.precision, '--device', args.device,
           '--seed', str(args.seed), '--threads', str(torch.get_num_threads())]
    if public:
        cmd += ['--reference-code', public]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f'measuring the peak memory of {key[0]} ({key[1]}, {shots}-shot) in a fresh process failed:\n'
                        + done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {'test_peak_mb': result['mb'], 'test_peak_total_mb': result['total_mb']}


def peak_of(args, device) -> dict:
    r"""The child side of `isolated_peak`: build, run one episode once to warm up, and measure the next one."""
    method, cdtg, shots = args.peak_of
    ep = episode(args.img_size, int(shots), 1, args.seed, device)
    model = build(method, cdtg == 'on', device)
    if args.reference_code:                      # the public network holds its own copy of the weights: ours goes
        run = public_hsnet(args.reference_code, model, ep)
        del model
        gc.collect()
    else:
        run = episode_runner(model, ep, args.precision, device)
    run()
    with PeakMemory(device) as mem:
        run()
    out = {'mb': mem.mb, 'total_mb': mem.total_mb}
    print(json.dumps(out))
    return out


def compare_kshot(model, ep, args, device) -> dict:
    r"""The same K-shot vote computed as the reference code does (a whole forward per shot: the query encoded again
    for every shot, then the vote; HSNet's correlation over every support pixel), the same with this project's
    correlation where that differs, and all K shots matched in one batch, timed alternately with the default."""
    runners = {'default': episode_runner(model, ep, args.precision, device),
               'reference': reference_kshot(model, ep, args.precision, device)}
    if hasattr(model, 'dense_correlation'):
        runners['reference_layers'] = reference_kshot(model, ep, args.precision, device, dense=False)
    times = interleaved(runners, device, args.reps, 0)
    model.match_shots = 'all'
    batched = timed(episode_runner(model, ep, args.precision, device), device, args.reps, 0)
    model.match_shots = 'auto'
    out = {'reference_kshot_s': statistics.median(times['reference']),
           'reference_pair_s': statistics.median(times['default']), 'batched_shots_s': statistics.median(batched)}
    if 'reference_layers' in times:
        out['reference_layers_kshot_s'] = statistics.median(times['reference_layers'])
    return out


def public_hsnet(path: str, model, ep) -> Callable[[], torch.Tensor]:
    r"""The public HSNet (github.com/juhongm999/hsnet, a local checkout at `path`) with `model`'s weights: returns a
    runner of its K-shot `predict_mask_nshot` on `ep` (batch 1, no gradients). Nothing of it is
    redistributed here; its `model/` package is imported under another name."""
    import importlib
    import types
    root = check_reference_code(path)
    if 'hsnet_public' not in sys.modules:
        package = types.ModuleType('hsnet_public')
        package.__path__ = [str(root)]
        sys.modules['hsnet_public'] = package
    public = importlib.import_module('hsnet_public.hsnet')
    resnet = public.resnet
    original = resnet.resnet50
    resnet.resnet50 = lambda pretrained=False, **kw: original(weights=None)     # no download: our weights go in
    try:
        net = public.HypercorrSqueezeNetwork('resnet50', False)
    finally:
        resnet.resnet50 = original
    missing, unexpected = net.backbone.load_state_dict(model.backbone.net.state_dict(), strict=False)
    if unexpected or any(not k.startswith('fc.') for k in missing):
        raise UserError(f'--reference-code {path}: its ResNet-50 does not take our backbone weights '
                        f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
    names = {'squeeze.0': 'encoder_layer4', 'squeeze.1': 'encoder_layer3', 'squeeze.2': 'encoder_layer2',
             'mix43': 'encoder_layer4to3', 'mix32': 'encoder_layer3to2', 'conv_query': 'conv1',
             'conv_support': 'conv2'}
    learner = {}
    for key, value in model.learner.state_dict().items():
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        learner[key] = value
    net.hpn_learner.load_state_dict(learner)                                   # strict: every tensor maps
    net = net.to(ep['query_img'].device).eval()
    batch = {'query_img': ep['query_img'], 'support_imgs': ep['support_imgs'], 'support_masks': ep['support_masks']}

    def run():
        with torch.no_grad():
            return net.predict_mask_nshot(batch, ep['support_imgs'].shape[1])
    return run


def check_reference_code(path: str) -> Path:
    root = Path(path) / 'model'
    if not (root / 'hsnet.py').is_file() or not (root / 'base' / 'correlation.py').is_file():
        raise UserError(f'--reference-code {path}: not a checkout of github.com/juhongm999/hsnet (expected '
                        f'{root / "hsnet.py"}); clone it with: git clone https://github.com/juhongm999/hsnet')
    return root


def compare_public_hsnet(model, ep, args, device) -> dict:
    r"""Time the public HSNet's K-shot prediction against ours on the same episode and weights (alternately), check
    that both predict the same mask, and measure its peak memory as ours (`--memory`)."""
    run_public = public_hsnet(args.reference_code, model, ep)
    ours = episode_runner(model, ep, args.precision, device)
    with torch.no_grad():
        theirs = run_public().long()
        mine = model.segment(ours())
    times = interleaved({'ours': ours, 'public': run_public}, device, args.reps, 0)
    out = {'public_s': statistics.median(times['public']), 'public_pair_s': statistics.median(times['ours']),
           'public_mask_agreement': float((theirs == mine).float().mean())}
    if args.memory == 'isolated':
        peak = isolated_peak(args, ('hsnet', 'off'), ep['support_imgs'].shape[1], public=args.reference_code)
        out['public_peak_total_mb'] = peak['test_peak_total_mb']
    return out


def _peak(row: dict) -> float:
    r"""The table's test peak: the process's whole peak when measured in a fresh process, else the growth."""
    return row['test_peak_total_mb'] if row.get('memory') == 'isolated' else row['test_peak_mb']


def _line(row: dict, rows: list[dict]) -> str:
    plain = next((r for r in rows if r['method'] == row['method'] and r['shots'] == row['shots']
                  and r['cdtg'] == 'off'), None)
    overhead = (f'{100 * (row["test_s"] / plain["test_s"] - 1):+6.1f}% {100 * row["hooks_s"] / plain["test_s"]:5.1f}%'
                if row['cdtg'] == 'on' and plain else ' ' * 14)
    train = f'{1 / row["train_s"]:7.2f}' if row['train_s'] else '      -'
    train_mb = f'{row["train_peak_mb"]:8.0f}' if row['train_peak_mb'] is not None else '       -'
    text = (f'{row["method"]:7s} {row["cdtg"]:4s} {row["shots"]:2d} | {1 / row["test_s"]:8.2f} '
            f'{1000 * row["test_s"]:9.1f} {_peak(row):8.0f} {overhead} | {train} {train_mb}')
    extra = []
    if 'reference_kshot_s' in row:
        ratio = row['reference_pair_s'] / row['reference_kshot_s']
        layers = (f' (with our correlation: {row["reference_pair_s"] / row["reference_layers_kshot_s"]:.2f}x)'
                  if 'reference_layers_kshot_s' in row else '')
        extra.append(f'vs reference K-shot (query re-encoded per shot) {ratio:.2f}x{layers}, '
                     f'shots batched {row["batched_shots_s"] / row["reference_kshot_s"]:.2f}x')
    if 'train_dense_s' in row:
        extra.append(f'train step vs dense correlation (the reference\'s) '
                     f'{row["train_pair_s"] / row["train_dense_s"]:.2f}x')
    if 'pinv_s' in row:
        extra.append(f'pinv/rank2 {row["pinv_s"] / row["test_s"]:.2f}')
    if 'public_s' in row:
        memory = (f', its peak {row["public_peak_total_mb"]:.0f} MB vs ours {row["test_peak_total_mb"]:.0f} MB'
                  if 'public_peak_total_mb' in row else '')
        extra.append(f'vs public HSNet code {row["public_pair_s"] / row["public_s"]:.2f}x (same mask on '
                     f'{100 * row["public_mask_agreement"]:.2f}% of pixels{memory})')
    return text + (' | ' + '; '.join(extra) if extra else '')


HEADER = ('method  cdtg  K |  test ep/s  ms/episode  peak MB  CD-TG  hooks | train st/s  peak MB | reference\n'
          + '-' * 117)


def bench_loader(args) -> dict:
    from data import FixedEpisodes, build_dataset, build_loader
    dataset = build_dataset(args.loader, args.datapath, 'test', args.shots[0], args.img_size)
    dataset.cache_size = args.cache_images
    episodes = dataset.sample_episodes(args.loader_episodes, args.seed)
    pairs = len({pair for ep in episodes for pair in ep.pairs()})
    loader = build_loader(dataset, FixedEpisodes(episodes), 1, args.workers)
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    seconds = time.perf_counter() - start
    cache = dataset.pair_cache
    decoded = cache.decoded if cache is not None else None
    where = (f'; shared image cache of {args.cache_images} pairs: {decoded} decodes into it for the {pairs} distinct '
             f'(image, class) pairs of the episodes' if cache is not None else f'; no image cache ({pairs} distinct '
             'pairs, each decoded by every episode that uses it)')
    print(f'loader {args.loader}: {n} episodes ({args.shots[0]}-shot, {args.img_size}px, {args.workers} workers) in '
          f'{seconds:.1f}s = {n / seconds:.1f} episodes/s{where}')
    return {'benchmark': args.loader, 'episodes': n, 'seconds': seconds, 'workers': args.workers,
            'cache_images': args.cache_images, 'distinct_pairs': pairs, 'cache_decodes': decoded}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--methods', nargs='+', default=None, help='default: every method of model.METHODS')
    p.add_argument('--cdtg', nargs='+', default=['off', 'on'], choices=['off', 'on'])
    p.add_argument('--shots', nargs='+', type=int, default=[1, 5])
    bounded(p, '--img-size', int, 400, low=MIN_IMG_SIZE, high=4096)
    bounded(p, '--reps', int, 3, low=1, help='timed test episodes per configuration')
    bounded(p, '--train-reps', int, 2, low=1, help='timed training steps per method')
    bounded(p, '--warmup', int, 1, low=0)
    bounded(p, '--train-bsz', int, 2, low=1, help='episodes per training step')
    p.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N | auto')
    p.add_argument('--precision', default='fp32', choices=tuple(PRECISIONS))
    bounded(p, '--threads', int, None, low=1, help='torch CPU threads (default: all cores available)')
    p.add_argument('--compare-reference', action='store_true',
                   help='also time PATNet --transform pinv and the reference K-shot formulation of the vote methods '
                        '(the query encoded again for every shot)')
    p.add_argument('--memory', default=None, choices=['isolated', 'inline'],
                   help='test-episode peak memory measured in a fresh process per configuration (default on CPU, '
                        'comparable with the peak of another program) or in this process (default with --quick '
                        'and on CUDA, where the allocator peak is exact in process)')
    p.add_argument('--reference-code', default=None, metavar='DIR',
                   help='a checkout of github.com/juhongm999/hsnet: also time its K-shot prediction and measure its '
                        'peak memory with the same weights and episodes as hsnet (--compare-reference not needed)')
    p.add_argument('--peak-of', nargs=3, default=None, metavar=('METHOD', 'CDTG', 'SHOTS'), help=argparse.SUPPRESS)
    p.add_argument('--quick', action='store_true', help='64x64, one repetition, no warm-up (a smoke run)')
    bounded(p, '--profile', int, 0, low=0,
            help='also profile one test episode per row (torch.profiler): its N costliest operators, the calls of '
                 "PyTorch's slow reference convolution and the backbone's share of the episode")
    p.add_argument('--loader', default=None, help='also time data loading alone for this benchmark')
    p.add_argument('--datapath', default='datasets')
    bounded(p, '--loader-episodes', int, 50, low=1)
    bounded(p, '--cache-images', int, 0, low=0,
            help="--loader: test.py's shared image cache of this many pairs (0 = off)")
    bounded(p, '--workers', int, 4, low=0)
    bounded(p, '--seed', int, 0, low=0)
    p.add_argument('--json', default=None, help='write the results here')
    args = parse_with_config(p, argv)
    loader_only = args.loader is not None and args.methods is None          # `--loader B`: data loading alone
    args.methods = [] if loader_only else (args.methods or sorted(METHODS))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UserError(f'--methods {", ".join(unknown)}: unknown; choose from {", ".join(sorted(METHODS))}')
    if any(k < 1 for k in args.shots):
        raise UserError('--shots must be >= 1')
    if args.quick:
        args.img_size, args.reps, args.train_reps, args.warmup = 64, 1, 1, 0
    device = resolve_device(args.device)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())
    torch.set_num_threads(threads)
    if args.reference_code:
        check_reference_code(args.reference_code)
    if args.peak_of:
        return peak_of(args, device)
    if args.memory is None:
        args.memory = 'inline' if args.quick or device.type == 'cuda' else 'isolated'
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
    if args.methods:
        print(f'{args.img_size}x{args.img_size}, {args.precision}, {where}, random weights; test: median of '
              f'{args.reps} episodes (batch 1) after {args.warmup} warm-up, with and without CD-TG timed alternately; '
              f'peak memory of a test episode ({args.memory}); train: 1-shot, {args.train_bsz} episodes per step')
    if args.quick:
        print('--quick: a smoke run at 64x64, one episode each; its times and shares are not figures (per-call '
              'overheads dominate at this size): measure at 400x400 without --quick')
    if args.methods:
        print(HEADER)
    out = {'img_size': args.img_size, 'device': where, 'precision': args.precision, 'torch': torch.__version__,
           'rows': bench_models(args, device)}
    if args.loader:
        out['loader'] = bench_loader(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f'wrote {args.json}')
    return out


if __name__ == '__main__':
    run_cli(main)
