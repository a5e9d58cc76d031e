r"""Parity with the public code: build a method's reference model from its own repository, copy our weights into it
and compare the two networks' outputs on the same episodes in float64.

    git clone https://github.com/Yang-Bob/PMMs /tmp/PMMs
    python scripts/parity.py --method pmms --reference-code /tmp/PMMs            # 1- and 5-shot, at our defaults
    python scripts/parity.py --method qnet --reference-code /tmp/Q-Net --size 96
    python scripts/parity.py --method rpmms --reference-code /tmp/PMMs --write-golden   # tests/golden/parity-rpmms.pt

Both models get the same deterministic weights (`tests/golden/make.py: deterministic_init`, by parameter name), so
the comparison needs no download. The reference is imported from its folder as published, with only these run-time
patches: `.cuda()` is the identity, torchvision's `pretrained=True` downloads are replaced by random initialisations
(our weights are copied over them), the EM initialisation that the reference draws at random is set to ours, and
Q-Net's path weights (a float32 tensor attribute that `.double()` does not convert) are float64.
Printed per case: max |Δ| and max |Δ| / max |ref| of the probabilities the reference predicts, and the agreement of
the two argmax masks. `--write-golden` stores the reference outputs with the episode seeds, so that
tests/test_parity.py checks parity in CI without the public code.

Repositories (the commits the golden files were written with): pmms, rpmms: Yang-Bob/PMMs @100d66b; qnet:
shenqq377/Q-Net @70a828d.
"""
import argparse
import contextlib
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.errors import UserError, run_cli  # noqa: E402

GOLDEN = ROOT / 'tests' / 'golden'
SHOTS = (1, 5)


# --- importing the reference ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_cuda():
    r"""`.cuda()` as the identity (the reference code moves tensors to the GPU unconditionally)."""
    saved = (torch.Tensor.cuda, nn.Module.cuda)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


@contextlib.contextmanager
def reference_imports(folder: Path, packages: tuple[str, ...]):
    r"""Import `packages` from the reference's folder (appended to sys.path, so our own top-level packages win);
    the imported modules are dropped afterwards, so references with the same package names (`models`) do not
    clash."""
    if not folder.is_dir():
        raise UserError(f'--reference-code {folder}: no such folder (clone the method\'s public repository there)')
    sys.path.append(str(folder))
    try:
        with no_cuda():
            yield
    finally:
        sys.path.remove(str(folder))
        for name in list(sys.modules):
            if name.split('.')[0] in packages:
                del sys.modules[name]


def _import(module: str, folder: Path):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f'could not import {module} from --reference-code {folder} ({err}); is it a clone of the '
                        'method\'s public repository?') from err


def copy_into(target: nn.Module, state: dict, mapping: list[tuple[str, str]]) -> None:
    r"""Copy `state` (ours) into `target` (the reference) by (our prefix, reference prefix) pairs; every reference
    tensor must be written exactly once (else the mapping is incomplete)."""
    ref = target.state_dict()
    written = set()
    for key, value in state.items():
        for ours, theirs in mapping:
            if key == ours or key.startswith(ours + '.'):
                name = theirs + key[len(ours):]
                if name not in ref or ref[name].shape != value.shape:
                    raise KeyError(f'{key} -> {name}: not in the reference or another shape')
                ref[name] = value.clone()
                written.add(name)
                break
    left = [k for k in ref if k not in written and not k.endswith('num_batches_tracked')]
    if left:
        raise KeyError(f'reference tensors without a value: {left[:5]} ({len(left)})')
    target.load_state_dict(ref)


# --- PMMs / RPMMs (Yang-Bob/PMMs) -------------------------------------------------------------------------------------
def _pmms_mapping(cascade: bool) -> list[tuple[str, str]]:
    mapping = [('backbone.net', 'model_res'), ('fuse', 'layer5'), ('compare', 'layer55.0'),
               ('merge.0', 'layer56.0'), ('classifier', 'layer9'), ('project.0', 'layer7.0')]
    if not cascade:
        mapping += [('compare_post', 'layer55.1'), ('merge.1', 'layer56.1'), ('project.1', 'layer7.1')]
    for i in range(3):
        mapping += [(f'residual.{i}.conv1', f'residule{i + 1}.1'), (f'residual.{i}.conv2', f'residule{i + 1}.3')]
    for i in range(5):
        mapping.append((f'psp.branches.{i}', f'layer6.layer6_{i}.0'))
    return mapping


class PMMsReference:
    r"""networks/FPMMs.py (pmms) or networks/FRPMMs.py (rpmms): `forward` for one shot, `forward_5shot` for K."""

    packages = ('models', 'networks')

    def __init__(self, method: str, ours, folder: Path):
        import torchvision
        self.cascade = method == 'rpmms'
        with reference_imports(folder, self.packages):
            net = _import('networks.FRPMMs' if self.cascade else 'networks.FPMMs', folder)
            pmms = _import('models.PMMs', folder)
            real_resnet50 = torchvision.models.resnet50
            torchvision.models.resnet50 = lambda pretrained=False, **kw: real_resnet50(weights=None, **kw)
            try:
                self.model = net.OneModel(argparse.Namespace(batch_size=1))
            finally:
                torchvision.models.resnet50 = real_resnet50
            self.pmms_class = pmms.PMMs
        state = {k: v for k, v in ours.state_dict().items() if not k.startswith('em_init_')}
        copy_into(self.model, state, _pmms_mapping(self.cascade))
        self.model.double().eval()
        # the EM initialisation: the reference draws mu at random in PMMs.__init__ (RPMMs: in every forward); ours
        self.inits = {int(k[len('em_init_'):]): v.double() for k, v in ours.state_dict().items()
                      if k.startswith('em_init_')}
        if not self.cascade:
            self.model.PMMs.mu = self.inits[self.model.num_pro][None]

    def probabilities(self, ep: dict) -> torch.Tensor:
        cls, inits = self.pmms_class, self.inits
        init = cls.__init__

        def seeded(module, c, k=3, stage_num=10):                   # RPMMs builds PMMs(256, k) in every forward
            init(module, c, k, stage_num)
            module.mu = inits[k][None]

        cls.__init__ = seeded
        try:
            with torch.no_grad(), no_cuda():
                q, s, m = ep['query_img'], ep['support_imgs'], ep['support_masks'].unsqueeze(2)
                self.model.batch_size = q.shape[0]
                if s.shape[1] == 1:
                    out = self.model(q, s[:, 0], m[:, 0])[-1]
                    return torch.softmax(F.interpolate(out, q.shape[-2:], mode='bilinear'), dim=1)    # get_pred
                out = self.model.forward_5shot(q, s, m)[-1]
                if self.cascade:                # the mean of the stages' softmax (the reference's argmax)
                    return F.interpolate(out * 5 / 3, q.shape[-2:], mode='bilinear')
                return torch.softmax(F.interpolate(out, q.shape[-2:], mode='bilinear'), dim=1)
        finally:
            cls.__init__ = init


# --- Q-Net (shenqq377/Q-Net) ------------------------------------------------------------------------------------------
class QNetReference:
    r"""models/fewshot.py's FewShotSeg with its ResNet-101 encoder (no pretrained file: ours are copied in); the
    prediction without refinement (`n_iters=0`, ours: `--finetune-steps 0`)."""

    packages = ('models',)

    def __init__(self, method: str, ours, folder: Path):
        with reference_imports(folder, self.packages):
            fewshot = _import('models.fewshot', folder)
            self.model = fewshot.FewShotSeg(pretrained_weights=None)
        self.model.device = torch.device('cpu')
        mapping = [('backbone.net', 'encoder.backbone'), ('reduce.0', 'encoder.reduce1'),
                   ('reduce.1', 'encoder.reduce2'), ('threshold_head', 'encoder.reduce1d')]
        copy_into(self.model, ours.state_dict(), mapping)
        self.model.double().eval()
        # its path weights are a plain float32 tensor attribute, which .double() leaves (0.9 -> 0.89999998)
        self.model.alpha = torch.tensor([0.9, 0.1], dtype=torch.float64)

    def probabilities(self, ep: dict) -> torch.Tensor:
        q, s, m = ep['query_img'], ep['support_imgs'], ep['support_masks']
        outs = []
        with torch.no_grad():
            for b in range(q.shape[0]):                   # the reference mixes the episodes of a batch: one at a time
                supp = [[s[b:b + 1, k] for k in range(s.shape[1])]]
                mask = [[m[b:b + 1, k] for k in range(s.shape[1])]]
                outs.append(self.model(supp, mask, [q[b:b + 1]], train=False, n_iters=0)[0])
        return torch.cat(outs)


REFERENCES = {'pmms': PMMsReference, 'rpmms': PMMsReference, 'qnet': QNetReference}
BACKBONES = {'qnet': 'resnet101'}          # the reference's backbone where ours defaults to another


# --- the comparison ---------------------------------------------------------------------------------------------------
def our_model(method: str, **options):
    r"""Our `method` at its defaults (or `options`) with the deterministic weights, float64, no test-time
    adaptation."""
    import warnings

    from model import build_method
    from tests.golden.make import deterministic_init
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = build_method(method, BACKBONES.get(method), 'none', **options)
    persistent = set(model.state_dict())
    constants = {n: b.clone() for n, b in model.named_buffers() if n not in persistent}   # constants, not weights
    deterministic_init(model)
    for name, value in constants.items():
        model.get_buffer(name).copy_(value)
    if method == 'qnet':         # cos(f_q, FP) ~ 0.91 on these weights: a threshold that keeps p off 0 and 1
        with torch.no_grad():
            model.threshold_head.bias.fill_(-18.0)
    model.set_test_time(finetune_steps=0)
    return model.double().eval()


def episodes(size: int) -> dict:
    r"""shots -> one episode (seed = shots) at `size`, float64."""
    from tests.golden.make import episode
    return {k: {key: v.double() if v.is_floating_point() else v for key, v in episode(k, 1, k, size).items()}
            for k in SHOTS}


def our_probabilities(model, ep: dict) -> torch.Tensor:
    with torch.no_grad():
        record = model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
        return torch.softmax(model.infer(record).logits, dim=1)


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    delta = float((ours - ref).abs().max())
    return {'max_abs': delta, 'max_rel': delta / max(float(ref.abs().max()), 1e-300),
            'argmax_agreement': float((ours.argmax(1) == ref.argmax(1)).double().mean())}


def _commit(folder: Path) -> str:
    import subprocess
    try:
        return subprocess.run(['git', '-C', str(folder), 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown (not a git clone)'


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--method', required=True, choices=sorted(REFERENCES))
    p.add_argument('--reference-code', required=True, type=Path, help="a clone of the method's public repository")
    p.add_argument('--size', type=int, default=48, help='image side of the episodes (default 48)')
    p.add_argument('--write-golden', action='store_true',
                   help='store the reference outputs in tests/golden/parity-<method>.pt')
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = our_model(args.method)
    reference = REFERENCES[args.method](args.method, model, args.reference_code)
    results = {}
    golden = {'method': args.method, 'size': args.size, 'reference': _commit(args.reference_code), 'cases': {}}
    for k, ep in episodes(args.size).items():
        ref = reference.probabilities(ep)
        results[k] = compare(our_probabilities(model, ep), ref)
        golden['cases'][k] = {'seed': k, 'foreground': ref[:, 1].clone()}        # [B,H,W]; background = 1 - it
        r = results[k]
        print(f'{args.method} {k}-shot {args.size}x{args.size} float64 vs {golden["reference"]}: max |d| '
              f'{r["max_abs"]:.2e}, relative '
              f'{r["max_rel"]:.2e}, argmax agreement {r["argmax_agreement"]:.4f}')
    if args.write_golden:
        path = GOLDEN / f'parity-{args.method}.pt'
        torch.save(golden, path)
        print(f'wrote {path}')
    return results


if __name__ == '__main__':
    run_cli(main)
