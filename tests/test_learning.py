r"""A short synthetic training run must lower the loss and clearly beat the untrained model on held-out episodes."""
import pytest
import torch

from engine.factory import build_model
from engine.training import _calibrate
from engine.loops import evaluate, train_epoch
from data import FixedEpisodes, TrainingEpisodes, build_dataset, build_loader


@pytest.mark.slow
def test_short_training_lowers_loss_and_beats_untrained(datapath):
    config = {'method': 'hsnet', 'backbone': 'resnet50', 'seed': 0, 'bn_calibration': 128}
    torch.manual_seed(0)
    trn = build_dataset('synthetic', datapath, 'trn', 1, 96)
    val = build_dataset('synthetic', datapath, 'val', 1, 96)
    model = build_model(config, 'none')
    _calibrate(model, trn, config['bn_calibration'], config['seed'], torch.device('cpu'))
    val_loader = build_loader(val, FixedEpisodes(val.sample_episodes(48, seed=0)), bsz=16, workers=0)
    before, _ = evaluate(model, val_loader, torch.device('cpu'), val.class_names)

    losses = []
    recipe = model.configure_optimizers(lr=1e-3)
    loader = build_loader(trn, TrainingEpisodes(trn, 8 * 80, seed=0), bsz=8, workers=0)
    train_epoch(model, loader, recipe, torch.device('cpu'), trn.class_names,
                on_step=lambda step, loss, terms: losses.append(float(loss.detach())))
    after, _ = evaluate(model, val_loader, torch.device('cpu'), val.class_names)

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f'loss {first:.3f} -> {last:.3f}; held-out mIoU {before["miou"]:.2f} -> {after["miou"]:.2f}')
    assert last < 0.7 * first
    assert after['miou'] > before['miou'] + 15
    assert after['fbiou'] > before['fbiou'] + 10
