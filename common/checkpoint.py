r"""Checkpoints: atomic, safe to load, self-verifying.

* Written atomically (temp file in the same folder, fsync, rename), with the user's umask (a shared lab folder can
  read them); a disk that fills up leaves the previous checkpoint intact and says how much space is needed; temp
  files left by a killed process are removed by `remove_stale_temp_files`.
* Read with `torch.load(weights_only=True)`: only tensors and plain Python values are accepted, so a crafted or
  foreign pickle fails with a clear message and nothing in it runs. Everything we store is plain (RNG states too).
* A content checksum (SHA-256 over every value, in a canonical order) is stored and verified on load, so a flipped
  byte is named instead of silently changing weights.
* Non-finite weights are never written (`NonFiniteError`), and `load_checkpoint(..., require_finite=True)` refuses
  them, naming the tensors.
Format version 1 (before these rules) held NumPy RNG states that `weights_only` cannot read: convert such files once
with `python scripts/convert_checkpoint.py OLD.pt` (only for files you trust).
"""
import errno
import hashlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from common.errors import UserError

FORMAT = 'cdtg-checkpoint'
VERSION = 2
_META = ('format', 'version', 'checksum')


class NonFiniteError(UserError):
    r"""A model holds NaN or infinite values."""


def content_digest(value) -> str:
    r"""SHA-256 of a (nested) checkpoint value: dict keys sorted, tensors by dtype, shape and raw bytes, other leaves
    by type and repr. Independent of how the file was serialised."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f'T{t.dtype}{tuple(t.shape)}'.encode())
            if t.numel():
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f'D{len(x)}'.encode())
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f'{type(x).__name__[0]}{len(x)}'.encode())
            for v in x:
                feed(v)
        else:
            h.update(f'{type(x).__name__}:{x!r}'.encode())
    feed(value)
    return h.hexdigest()


def non_finite_tensors(state: dict) -> list[str]:
    r"""Names of floating-point tensors of a state dict that hold NaN or infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _size(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 64


def save_checkpoint(state: dict, path: str | Path) -> None:
    r"""Write `state` to `path` so that a crash leaves either the old or the new file, never a torn one.

    Raises `NonFiniteError` (nothing written) when `state['model']` holds NaN/inf, and a `UserError` naming the folder
    and the space needed when the disk is full (the partial file is removed, the previous checkpoint kept).
    """
    path = Path(path)
    state = {k: v for k, v in state.items() if k not in _META}
    bad = non_finite_tensors(state.get('model', {}))
    if bad:
        raise NonFiniteError(f'refusing to write {path}: the model holds NaN/inf values in {len(bad)} tensors '
                             f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f'cannot create the folder {path.parent} for {path.name} ({err.strerror}); choose another '
                        '--logpath') from err
    payload = dict(state, format=FORMAT, version=VERSION, checksum=content_digest(state))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
        with os.fdopen(fd, 'wb') as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())            # mkstemp makes 0600; checkpoints follow the user's umask
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise UserError(f'disk full while writing {path}: it needs about {_size(state) / 2**20:.0f} MiB, '
                            f'{free / 2**20:.0f} MiB are free in {path.parent}. The previous checkpoint (if any) is '
                            'intact; free some space and resume with --resume') from err
        raise UserError(f'cannot write checkpoint {path}: {err.strerror or err}') from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    r"""Remove the temp files (`.<name>.pt.*.tmp`) a killed save left in `folder`; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob('.*.pt.*.tmp'):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def load_checkpoint(path: str | Path, map_location='cpu', require_finite: bool = False) -> dict:
    r"""Load a checkpoint written by `save_checkpoint`; anything else is a `UserError` naming the file."""
    path = Path(path)
    if path.is_dir():
        hint = ' or '.join(str(path / n) for n in ('best.pt', 'last.pt') if (path / n).exists())
        raise UserError(f'{path} is a run folder; pass {hint or path / "best.pt"}')
    if not path.is_file():
        raise UserError(f'checkpoint {path} does not exist (train one with `python train.py ... --logpath DIR`, '
                        'which writes DIR/best.pt and DIR/last.pt)')
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if 'numpy' in str(err):
            raise UserError(f'{path} was written by an older version of this code (checkpoint format 1, with NumPy '
                            f'RNG state). Convert it once: python scripts/convert_checkpoint.py {path} '
                            '(only for files you trust)') from err
        raise UserError(f'{path} is not a CD-TG checkpoint: it holds Python objects other than tensors and plain '
                        f'values, which are never loaded (nothing in it was run). Detail: {_first_line(err)}') from err
    except Exception as err:  # noqa: BLE001 - whatever a damaged or foreign file raises inside torch.load
        raise UserError(f'{path} is not a readable PyTorch checkpoint (truncated or corrupt?): '
                        f'{type(err).__name__}: {_first_line(err)}') from err
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise UserError(f'{path} is not a CD-TG checkpoint (no "{FORMAT}" tag); pass a best.pt or last.pt '
                        'written by train.py')
    if state.get('version', 0) > VERSION:
        raise UserError(f'{path} was written by a newer version of this code (format {state["version"]})')
    for key in ('model', 'config'):
        if key not in state:
            raise UserError(f'{path} is a damaged CD-TG checkpoint: key {key!r} is missing')
    if 'checksum' in state:
        content = {k: v for k, v in state.items() if k not in _META}
        if content_digest(content) != state['checksum']:
            raise UserError(f'{path} is corrupt: its content does not match the checksum stored when it was written '
                            '(a changed byte on disk or in transfer); use another copy, e.g. last.pt or a backup')
    if require_finite:
        bad = non_finite_tensors(state['model'])
        if bad:
            raise NonFiniteError(f'{path} holds NaN/inf weights in {len(bad)} tensors ({", ".join(bad[:3])}'
                                 f'{", ..." if len(bad) > 3 else ""}); it cannot be evaluated (the training run '
                                 'diverged: lower --lr)')
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def strip_prefixes(state_dict: dict) -> dict:
    r"""Drop `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes from parameter names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
