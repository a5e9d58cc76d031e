r"""Shared fixtures: generated synthetic benchmarks and one tiny trained checkpoint per test session."""
import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Frozen CLIP text embeddings are cached per session, never in the user's ~/.cache.
if 'CDTG_CACHE' not in os.environ:
    os.environ['CDTG_CACHE'] = tempfile.mkdtemp(prefix='cdtg-test-cache-')
    atexit.register(shutil.rmtree, os.environ['CDTG_CACHE'], ignore_errors=True)

TINY_TRAIN = ['--method', 'hsnet', '--benchmark', 'synthetic', '--backbone', 'resnet50', '--backbone-weights', 'none',
              '--img-size', '64', '--bsz', '4', '--epochs', '1', '--episodes-per-epoch', '8', '--val-episodes', '4',
              '--workers', '0', '--seed', '0', '--tb-images', '0']


@pytest.fixture(autouse=True)
def _keep_thread_count():
    r"""A test that changes torch's thread count (or a script's main it calls: bench.py --threads 1) does not leave it
    changed for the tests after it (it used to: every test after tests/test_bench.py ran on one thread)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope='module')
def one_thread():
    r"""One torch thread for a module of many small ops: on a shared 2-core machine, with 2 threads every op can stall
    on a descheduled worker (the PMMs/Q-Net and DMTNet/IFA tests ran 4-10x slower). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope='session')
def untrained_checkpoint(tmp_path_factory):
    r"""An HSNet checkpoint with random weights at 64x64 (no training, no download) that test.py can load, built once
    on one thread (tests/fixtures_targets.py `tiny_checkpoint`): for the target benchmarks' command-line tests."""
    from fixtures_targets import tiny_checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tiny_checkpoint(tmp_path_factory.mktemp('untrained') / 'best.pt')
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_cdtg_checkpoint(tiny_checkpoint, tmp_path_factory):
    r"""The tiny HSNet with a CD-TG plug-in attached (random CLIP weights, fresh alignment modules, feature gates set
    to 1 so the text changes the outputs), saved as train.py would: no training, for CLI plumbing tests."""
    from common.checkpoint import load_checkpoint, save_checkpoint
    from engine.factory import build_model, plugin_record
    ckpt = load_checkpoint(tiny_checkpoint)
    config = dict(ckpt['config'], cdtg=True, clip='ViT-B-32', clip_weights='none', cdtg_attn='paper', alpha=0.7,
                  fusion='fixed', no_style_aug=False, text_lora=0, text_cache=None)
    torch.manual_seed(0)
    model = build_model(config, None)
    state = model.state_dict()
    state.update(ckpt['model'])
    state['hooks.gate'] = torch.ones_like(state['hooks.gate'])
    model.load_state_dict(state)
    meta = {k: v for k, v in ckpt.items() if k not in ('format', 'version', 'checksum', 'optimizer')}
    path = tmp_path_factory.mktemp('tiny_cdtg_run') / 'best.pt'
    save_checkpoint(dict(meta, model=model.state_dict(), config=config, plugin=plugin_record(model), optimizer={}),
                    path)
    return path
