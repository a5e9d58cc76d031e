r"""Prepare the Synapse abdominal CT set once: NIfTI volumes -> windowed, ROI-cropped, resampled volumes + manifest.

    python scripts/prepare_abdct.py --datapath DATA        # reads DATA/Synapse/RawData/Training/{img,label}/
                                                           # writes DATA/Synapse/prepared_abdct/

SSL-ALPNet's preprocessing (see data/abdct.py for what is reproduced and what differs): window [-125, 275] HU and
min-max to [0, 1], 32/512 border cut, in-plane resampling to 256 x 256 on SimpleITK's grid, labels spleen 1, right
kidney 2, left kidney 3, liver 4 (the other challenge organs are background), one orientation (L, P, S).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_with_config  # noqa: E402
from common.errors import run_cli  # noqa: E402
from data.abdct import AbdCT  # noqa: E402
from data.volumes import prepare_main, prepare_parser  # noqa: E402


def build_parser():
    return prepare_parser(AbdCT, 'Prepare the Synapse abdominal CT cache read by the abd-ct benchmark.',
                          'folder holding Synapse/RawData/Training (or RawData/Training, or Training)')


def main(argv=None) -> dict:
    return prepare_main(AbdCT, parse_with_config(build_parser(), argv))


if __name__ == '__main__':
    run_cli(main)
