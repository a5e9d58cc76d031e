r"""Prepare MS-CMRSeg 2019 bSSFP (C0) once: NIfTI volumes + manual labels -> normalised volumes and a manifest.

    python scripts/prepare_cmr.py --datapath DATA    # reads DATA/C0LET2_nii45_for_challenge19/{c0t2lge,c0gt}/
                                                     # writes DATA/C0LET2_nii45_for_challenge19/prepared_C0/

Labels 200/500/600 -> LV myocardium 1, LV blood pool 2, right ventricle 3 (any other value is an error naming the
file); intensities clipped above the 99.5th percentile and scaled to [0, 1] per volume; stored slice order, no
resampling or cropping (see data/cmr.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_with_config  # noqa: E402
from common.errors import run_cli  # noqa: E402
from data.cmr import CMR  # noqa: E402
from data.volumes import prepare_main, prepare_parser  # noqa: E402


def build_parser():
    return prepare_parser(CMR, 'Prepare the MS-CMRSeg bSSFP cache read by the cmr benchmark.',
                          'folder holding C0LET2_nii45_for_challenge19/{c0t2lge,c0gt} (or that folder itself)')


def main(argv=None) -> dict:
    return prepare_main(CMR, parse_with_config(build_parser(), argv))


if __name__ == '__main__':
    run_cli(main)
