r"""Build a method (and, later, its plug-in) from a run configuration, or from a checkpoint."""
import torch

from common.checkpoint import load_checkpoint
from common.errors import UserError
from model import FewShotSegmenter, build_method


def build_model(config: dict, backbone_weights: str | None) -> FewShotSegmenter:
    r"""The model a run configuration describes. `backbone_weights=None` leaves the backbone for a checkpoint."""
    return build_method(config['method'], config['backbone'], backbone_weights)


def load_model(path: str, device: torch.device) -> tuple[FewShotSegmenter, dict]:
    r"""Rebuild the model recorded in a checkpoint, load its weights, move it to `device` in eval mode."""
    ckpt = load_checkpoint(path)
    config = ckpt['config']
    model = build_model(config, None)
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as err:
        raise UserError(f'checkpoint {path} does not fit method {config["method"]} with backbone '
                        f'{config["backbone"]}: {str(err).splitlines()[0]}') from err
    return model.to(device).eval(), ckpt
