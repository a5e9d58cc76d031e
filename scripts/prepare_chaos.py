r"""Prepare CHAOS MR T2-SPIR once: DICOM series + Ground PNGs -> normalised volumes, organ labels and a manifest.

    python scripts/prepare_chaos.py --datapath DATA        # reads DATA/CHAOS/Train_Sets/MR/<pid>/T2SPIR/...
                                                           # writes DATA/CHAOS/prepared_T2SPIR/

Slices are read with pydicom and sorted by ImagePositionPatient along the slice normal (InstanceNumber as the
fallback), paired with Ground/<same stem>.png, the label gray ranges mapped to organ ids (liver 1, right kidney 2,
left kidney 3, spleen 4; any other value is an error), intensities clipped above the 99.5th percentile and scaled
to [0, 1] per volume. No resampling or cropping (see data/chaos.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_with_config  # noqa: E402
from common.errors import run_cli  # noqa: E402
from data.chaos import Chaos  # noqa: E402
from data.volumes import prepare_main, prepare_parser  # noqa: E402


def build_parser():
    return prepare_parser(Chaos, 'Prepare the CHAOS MR T2-SPIR cache read by the chaos benchmark.',
                          'folder holding CHAOS/Train_Sets/MR (or Train_Sets/MR)')


def main(argv=None) -> dict:
    return prepare_main(Chaos, parse_with_config(build_parser(), argv))


if __name__ == '__main__':
    run_cli(main)
