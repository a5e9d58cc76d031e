r"""The one test-time adaptation harness: snapshot -> adapt on the episode -> predict -> restore, per episode.

Every method with test-time adaptation (PATNet's TFI, Q-Net's prototype refinement, DMTNet's self-finetuning,
IFA's adaptation) declares what it optimises (`adaptation_parameters`) and the objective of one step
(`adaptation_loss`); this harness does the rest, identically for all of them:

  * episodes of a batch are adapted one by one (a model parameter cannot serve two episodes at once);
  * gradients are enabled even when the caller runs under `torch.no_grad()` or `torch.inference_mode()` (the
    episode's tensors are cloned out of inference mode first);
  * a fresh optimizer per episode (`adaptation_optimizer`, Adam by default), `adaptation.steps` steps; gradients are
    taken only with respect to the adapted tensors (nothing accumulates in any other `.grad`);
  * if an adapted parameter belongs to the backbone, the episode is encoded again with the adapted weights;
  * then `match` predicts, and finally every model parameter and buffer that could have moved, and every `.grad`,
    is restored bit for bit (in a `finally`, so also after an error). Tensors the method put into `record.state`
    die with the record.
"""
from typing import TYPE_CHECKING

import torch

from model.records import EpisodeRecord, Output

if TYPE_CHECKING:                                   # the interface imports this module, not the other way
    from model.base import FewShotSegmenter


class Snapshot:
    r"""Exact copies of some parameters (values and .grad) and of all buffers of a model, restored by `restore`."""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor]):
        owned = {id(p) for p in model.parameters()}
        self.params = [p for p in params if id(p) in owned]
        self.values = [p.detach().clone() for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for p, value, grad in zip(self.params, self.values, self.grads):
            p.copy_(value)
            p.grad = grad
        for b, value in self.buffers:
            b.copy_(value)


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def adapt_and_match(model: 'FewShotSegmenter', record: EpisodeRecord) -> Output:
    r"""Test-time adaptation of every episode of `record`, each from the same starting weights; returns the
    concatenated outputs (logits along the batch dimension; aux entries are dropped)."""
    logits = []
    with torch.inference_mode(False):
        for i in range(record.batch):
            episode = record.episode(i).map_tensors(_clone)
            logits.append(_adapt_one(model, episode).logits)
    return Output(torch.cat(logits))


def _adapt_one(model: 'FewShotSegmenter', record: EpisodeRecord) -> Output:
    with torch.enable_grad():
        params = model.adaptation_parameters(record)
    snapshot = Snapshot(model, params)
    requires = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        optimizer = model.adaptation_optimizer(params)
        for step in range(model.adaptation.steps):
            with torch.enable_grad():
                loss = model.adaptation_loss(record, step)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        backbone = {id(p) for p in model.backbone.parameters()}
        if any(id(p) in backbone for p in params):           # the features moved: encode with the adapted weights
            with torch.no_grad():
                record = model.encode(record.query_img, record.supports.imgs, record.supports.masks,
                                      record.ctx.class_id)
        with torch.no_grad():
            return model.match_episode(record)
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        snapshot.restore()
