r"""Convert a checkpoint written by an older version of this code to the current format, once.

    python scripts/convert_checkpoint.py logs/run/best.pt                  # writes logs/run/best.v2.pt
    python scripts/convert_checkpoint.py OLD.pt --out NEW.pt

Format 1 (before safe loading) stored NumPy RNG states, which `torch.load(weights_only=True)` refuses, and no
checksum or method options. This script reads the old file with full unpickling — which can run code stored in the
file, so use it only on files you trust (your own runs) — and writes it in the current format: plain RNG state,
method options (what the old code used: the method's `legacy_options`, else its defaults), content checksum. The
weights are unchanged (the script checks that the new file loads and holds the same tensors).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import parse_with_config  # noqa: E402
from common.checkpoint import FORMAT, load_checkpoint, save_checkpoint  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from model import stored_options  # noqa: E402


def convert(old: dict) -> dict:
    r"""The current-format state of an old checkpoint dict."""
    state = {k: v for k, v in old.items() if k not in ('format', 'version', 'checksum')}
    config = dict(state['config'])
    config['method_options'] = stored_options(config['method'], config.get('method_options'))
    state['config'] = config
    rng = state.get('rng')
    if rng is not None and isinstance(rng.get('numpy'), tuple) and isinstance(rng['numpy'][1], np.ndarray):
        name, keys, pos, has_gauss, cached = rng['numpy']
        rng = dict(rng, numpy=(name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                               float(cached)))
        state['rng'] = rng
    return state


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('checkpoint', help='the old best.pt / last.pt (a file you trust)')
    p.add_argument('--out', default=None, help='where to write the converted file (default: <name>.v2.pt beside it)')
    args = parse_with_config(p, argv)
    src = Path(args.checkpoint)
    if not src.is_file():
        raise UserError(f'{src} does not exist')
    out = Path(args.out) if args.out else src.with_name(f'{src.stem}.v2{src.suffix}')
    if out.resolve() == src.resolve():
        raise UserError('--out must differ from the input (the original is kept)')
    try:
        old = torch.load(src, map_location='cpu', weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure means "not a checkpoint"
        raise UserError(f'{src} is not a readable PyTorch checkpoint: {err}') from err
    if not isinstance(old, dict) or old.get('format') != FORMAT or 'model' not in old or 'config' not in old:
        raise UserError(f'{src} is not a CD-TG checkpoint')
    new = convert(old)
    save_checkpoint(new, out)
    check = load_checkpoint(out)
    same = all(torch.equal(check['model'][k], v) for k, v in old['model'].items())
    if not same or set(check['model']) != set(old['model']):
        raise UserError(f'conversion check failed: {out} does not hold the same weights as {src}')
    print(f'converted {src} -> {out} ({len(old["model"])} tensors, same weights)')
    return out


if __name__ == '__main__':
    run_cli(main)
