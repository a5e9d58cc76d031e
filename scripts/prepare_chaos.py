r"""Prepare CHAOS MR T2-SPIR once: DICOM series + Ground PNGs -> normalised volumes, organ labels and a manifest.

    python scripts/prepare_chaos.py --datapath DATA        # reads DATA/CHAOS/Train_Sets/MR/<pid>/T2SPIR/...
                                                           # writes DATA/CHAOS/prepared_T2SPIR/

Slices are read with pydicom and sorted by ImagePositionPatient along the slice normal (InstanceNumber as the
fallback), paired with Ground/<same stem>.png, the label gray ranges mapped to organ ids (liver 1, right kidney 2,
left kidney 3, spleen 4; any other value is an error), intensities clipped above the 99.5th percentile and scaled
to [0, 1] per volume. No resampling or cropping (see data/chaos.py).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_with_config  # noqa: E402
from common.errors import run_cli  # noqa: E402
from data.chaos import MANIFEST, ORGANS, prepare  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Prepare the CHAOS MR T2-SPIR cache read by the chaos benchmark.')
    p.add_argument('--datapath', required=True, help='folder holding CHAOS/Train_Sets/MR (or Train_Sets/MR)')
    p.add_argument('--out', default=None,
                   help='cache folder (default <datapath>/CHAOS/prepared_T2SPIR; elsewhere: pass the same folder '
                        'to test.py --chaos-cache)')
    p.add_argument('--overwrite', action='store_true', help='rebuild an existing cache')
    p.add_argument('--skip-bad', action='store_true',
                   help='leave out patients with missing, unreadable or mislabelled files (with a warning) instead '
                        'of stopping')
    return p


def main(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    out = prepare(args.datapath, args.out, skip_bad=args.skip_bad, overwrite=args.overwrite)
    manifest = json.loads((out / MANIFEST).read_text())
    vols = manifest['volumes']
    slices = sum(v['shape'][0] for v in vols)
    print(f'prepared {len(vols)} volumes ({slices} slices) from {manifest["raw_root"]} into {out}')
    for organ in ORGANS:
        n = sum(len(v['organ_slices'][organ]) for v in vols)
        print(f'  {organ}: {n} slices in {sum(bool(v["organ_slices"][organ]) for v in vols)} volumes')
    orders = sorted({v['order'] for v in vols})
    print(f'slice order from: {", ".join(orders)}')
    if manifest['skipped']:
        print(f'left out (--skip-bad): patients {", ".join(manifest["skipped"])}')
    cache = f' --chaos-cache {out}' if args.out else ''
    print(f'next: python test.py --benchmark chaos --datapath {args.datapath}{cache} --load CKPT '
          '[--protocol volumetric]')
    return manifest


if __name__ == '__main__':
    run_cli(main)
