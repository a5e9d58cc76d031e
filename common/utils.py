r"""Seeding, device choice and moving batches to a device."""
import random

import numpy as np
import torch

from common.errors import UserError


def seed_everything(seed: int) -> None:
    r"""Seed Python, NumPy and torch (all devices) once. cuDNN flags are left alone (see `configure_backends`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    r"""`auto` picks CUDA when available, else CPU; `cuda` without a GPU is a clear error."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {name} was requested but no CUDA device is available; use --device cpu or auto')
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f'--device {name!r} is not a valid device (use auto, cpu, cuda or cuda:N)') from err


def configure_backends(device: torch.device, deterministic: bool = False, tf32: bool = True) -> None:
    r"""Set cuDNN/TF32 flags once per run (never per epoch). Deterministic mode is an explicit opt-in.

    TF32 runs float32 matmuls and convolutions on CUDA with 10-bit mantissas (~1e-3 relative error in HSNet's
    512-2048-channel cosine correlations): train.py keeps it on (speed), test.py turns it off unless `--tf32`, so
    evaluation matches the float32 reference code (PyTorch 1.5 had no TF32)."""
    if device.type != 'cuda':
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32 and not deterministic
    torch.backends.cudnn.allow_tf32 = tf32 and not deterministic


def to_device(batch: dict, device: torch.device) -> dict:
    r"""Copy every tensor of an episode batch to `device` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_seed(seed: int, epoch: int, step: int) -> int:
    r"""The seed of training step (epoch, step) of a run: a fixed function of the three, so every random draw of a
    step (the plug-in's style augmentation, dropout, ...) is the same in a straight and in a resumed run, for any
    number of loader workers."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_step(seed: int, epoch: int, step: int) -> None:
    r"""Seed torch (all devices), Python and NumPy for one training step (see `step_seed`)."""
    s = step_seed(seed, epoch, step)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def rng_state() -> dict:
    r"""The global random streams as plain values (tensors, ints, tuples), so checkpoints load with
    `weights_only=True`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state['numpy']
    keys = np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys).astype(np.uint32)
    np.random.set_state((name, keys, int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
