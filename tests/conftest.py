r"""Shared fixtures: generated synthetic benchmarks and one tiny trained checkpoint per test session."""
import os
import tempfile
import warnings

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Frozen CLIP text embeddings are cached per session, never in the user's ~/.cache.
os.environ.setdefault('CDTG_CACHE', tempfile.mkdtemp(prefix='cdtg-test-cache-'))

TINY_TRAIN = ['--method', 'hsnet', '--benchmark', 'synthetic', '--backbone', 'resnet50', '--backbone-weights', 'none',
              '--img-size', '64', '--bsz', '4', '--epochs', '1', '--episodes-per-epoch', '8', '--val-episodes', '4',
              '--workers', '0', '--seed', '0']


@pytest.fixture(scope='session')
def datapath(tmp_path_factory):
    r"""A data folder in which `synthetic` and `synthetic-med` are generated once for the whole session."""
    from data.synthetic import ensure_generated
    root = tmp_path_factory.mktemp('datasets')
    ensure_generated('synthetic', root)
    ensure_generated('synthetic-med', root)
    return root


@pytest.fixture(scope='session')
def tiny_checkpoint(datapath, tmp_path_factory):
    r"""best.pt of a one-epoch HSNet run on `synthetic` at 64x64 (random backbone): fast, for CLI plumbing tests."""
    import train
    logpath = tmp_path_factory.mktemp('tiny_run')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train.main(TINY_TRAIN + ['--datapath', str(datapath), '--logpath', str(logpath)])
    return logpath / 'best.pt'
