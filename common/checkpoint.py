r"""Atomic checkpoints (temp file, fsync, rename) with a format tag so foreign files give a clear error."""
import os
import tempfile
from pathlib import Path

import torch

from common.errors import UserError

FORMAT = 'cdtg-checkpoint'
VERSION = 1


def save_checkpoint(state: dict, path: str | Path) -> None:
    r"""Write `state` to `path` so that a crash leaves either the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(state, format=FORMAT, version=VERSION)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str | Path, map_location='cpu') -> dict:
    r"""Load a checkpoint written by `save_checkpoint`; anything else is a `UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint {path} does not exist (train one with `python train.py ... --logpath DIR`, '
                        'which writes DIR/best.pt and DIR/last.pt)')
    try:
        # weights_only=False: our checkpoints hold RNG states (numpy arrays) next to the tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise UserError(f'{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})') from err
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise UserError(f'{path} is not a CD-TG checkpoint (no "{FORMAT}" tag); pass a best.pt or last.pt '
                        'written by train.py')
    if state.get('version', 0) > VERSION:
        raise UserError(f'{path} was written by a newer version of this code (format {state["version"]})')
    for key in ('model', 'config'):
        if key not in state:
            raise UserError(f'{path} is a damaged CD-TG checkpoint: key {key!r} is missing')
    return state


def strip_prefixes(state_dict: dict) -> dict:
    r"""Drop `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes from parameter names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
