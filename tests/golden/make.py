r"""Golden outputs of HSNet and PATNet, written by the code of a given commit and compared by tests/test_methods.py.

    python -m tests.golden.make            # rewrites tests/golden/outputs.pt (only when an output *should* change)

Weights come from `deterministic_init`, which fills every parameter and buffer from its *name* (not from the order
in which modules are built), so the same names give the same network in any version of the code; the episode
inputs come from a seeded generator, and CD-TG's text embeddings are replaced by fixed stand-ins. The committed
tests/golden/outputs.pt was written at commit 3402d3a, with that commit's interface (`model(...)` returning per-shot
logits, `episode_logits` for TFI): the tests prove that HSNet and PATNet compute exactly what they computed before
the staged pipeline. `main` below writes the same file with today's interface.
"""
import zlib
from pathlib import Path

import torch

from data.synthetic import elliptic_episode

GOLDEN = Path(__file__).with_name('outputs.pt')
SIZE = 64
CASES = [  # (name, method, options, nshot, batch)
    ('hsnet-1shot', 'hsnet', {}, 1, 2),
    ('hsnet-5shot', 'hsnet', {}, 5, 1),
    ('patnet-1shot', 'patnet', {}, 1, 2),
    ('patnet-5shot', 'patnet', {}, 5, 1),
    ('patnet-pinv-1shot', 'patnet', {'transform': 'pinv'}, 1, 2),
]


@torch.no_grad()
def deterministic_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    r"""Fill every floating-point parameter and buffer from a generator seeded by (seed, name): weights with
    N(0, 1/fan_in), 1-d parameters named *weight* with 1 + 0.1 N(0, 1), other 1-d tensors with 0.1 N(0, 1),
    BatchNorm running variances with 1 + 0.1 |N(0, 1)|."""
    state = dict(model.named_parameters())
    state.update({k: v for k, v in model.named_buffers() if v.is_floating_point()})
    for name in sorted(state):
        t = state[name]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        if t.dim() >= 2:
            value = noise / max(t[0].numel(), 1) ** 0.5
        elif name.endswith('running_var'):
            value = 1 + 0.1 * noise.abs()
        elif name.endswith('weight'):
            value = 1 + 0.1 * noise
        else:
            value = 0.1 * noise
        t.copy_(value.to(t.dtype))
    return model


def episode(nshot: int, batch: int, seed: int = 0, size: int = SIZE):
    r"""Random images and elliptic support masks (and query masks) of varied size and position."""
    return elliptic_episode(size, nshot, batch, seed, radius_span=0.25)

CDTG_CASES = [  # (name, method, nshot, batch): the plug-in at alpha 0.7 with fixed stand-in text embeddings
    ('hsnet-cdtg-1shot', 'hsnet', 1, 2),
    ('patnet-cdtg-5shot', 'patnet', 5, 1),
]
CDTG_CLASSES = ['skin lesion', 'cell nucleus', 'cell cytoplasm', 'lung']


def cdtg_config(method: str, cache: str) -> dict:
    r"""The plug-in as the golden outputs were written: without `cdtg_text_bias`, a configuration means the
    template's text bias (as every checkpoint written before the bounded form existed)."""
    return {'method': method, 'backbone': 'resnet50', 'cdtg': True, 'clip': 'ViT-B-32', 'clip_weights': 'none',
            'cdtg_attn': 'paper', 'alpha': 0.7, 'fusion': 'fixed', 'no_style_aug': False, 'text_lora': 0,
            'text_cache': cache, 'seed': 0}


def stand_in_text(plugin) -> None:
    r"""Replace the bound text table by fixed unit vectors (so the golden outputs do not depend on CLIP)."""
    table = plugin.text_table
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(table.shape, generator=gen)
    plugin.text_table = values / values.norm(dim=-1, keepdim=True)


def main() -> None:
    import tempfile
    import warnings

    from engine.factory import build_model
    from model import build_method
    warnings.simplefilter('ignore')
    torch.set_num_threads(2)
    out = {'commit': 'HEAD', 'cases': {}}
    for name, method, options, k, b in CASES:
        model = deterministic_init(build_method(method, 'resnet50', 'none', **options)).eval()
        ep = episode(k, b)
        with torch.no_grad():
            output = model(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
            case = {'logits': output.logits, 'loss': model.loss(output, ep)['ce'], 'pred': model.segment(output),
                    'keys': {key: tuple(v.shape) for key, v in model.state_dict().items()}}
            if method == 'patnet' and not options and k == 1:
                model.set_test_time(finetune_steps=3, finetune_lr=0.05)
                record = model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
                case['tfi_logits'] = model.infer(record).logits
        out['cases'][name] = case
    for name, method, k, b in CDTG_CASES:
        model = deterministic_init(build_model(cdtg_config(method, tempfile.mkdtemp()), 'none')).eval()
        model.hooks.bind('synthetic-med', CDTG_CLASSES)
        stand_in_text(model.hooks)
        ep = episode(k, b)
        ep['class_id'] = torch.arange(b) % len(CDTG_CLASSES)
        with torch.no_grad():
            output = model(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
        out['cases'][name] = {'logits': output.logits, 'loss': model.loss(output, ep)['ce'],
                              'pred': model.segment(output),
                              'keys': {key: tuple(v.shape) for key, v in model.state_dict().items()}}
    torch.save(out, GOLDEN)
    print(f'wrote {GOLDEN}')


if __name__ == '__main__':
    main()
