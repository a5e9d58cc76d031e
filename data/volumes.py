r"""Prepared-volume benchmarks (`chaos`, `abd-ct`, `cmr`): a raw layout read once into a cache, and its loader.

A benchmark of this kind subclasses `PreparedVolumes` and says how to find and read its raw layout (`find_raw_root`,
`iter_raw`) and how to turn one raw volume into the cached one (`prepare_volume`: normalisation, resampling,
orientation). Everything else is shared:
  * `prepare_cache` (behind scripts/prepare_<benchmark>.py) reads the raw volumes one at a time, writes
    `image_<pid>.npy` (float32 [D,H,W] in [0, 1], slices first), `label_<pid>.npy` (uint8 class ids, 0 background)
    and `manifest.json` (format/version, classes, preprocessing, per-volume shape and slice indices of every class)
    into a temporary folder that replaces the cache only when everything is written;
  * the loader reads only that cache (checked on construction; scripts/check_data.py also re-reads the raw files,
    or, before preparation, reports on them and prints the preparation command);
  * 2D episodes: the slices that contain a class, with supports from *other* volumes; a slice is shown to the
    networks as round(255 x value) replicated to RGB with ImageNet normalisation, like every other target;
  * the volumetric protocol's accessors (`volumes`, `organ_slices`, `load_slice`; engine/volumetric.py).
"""
import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError
from data.checks import CheckedDataset, DataReport, layout_error
from data.episodic import write_json_atomic

MANIFEST = 'manifest.json'


def pid_order(pid: str):
    r"""Sort key of a volume id: numeric ids by value ('8' before '10', '0002' before '0010'), then the others."""
    return (0, int(pid), '') if pid.isdigit() else (1, 0, pid)


def class_slices(label: np.ndarray, class_id: int) -> list[int]:
    r"""Indices of the slices of a [D,H,W] label volume that contain `class_id`."""
    return np.flatnonzero((label == class_id).any((1, 2))).tolist()


#: SSL-ALPNet's MR intensity clip (CHAOS, cardiac MRI): above this percentile of the volume.
MR_CLIP_PERCENTILE = 99.5


def percentile_normalise(image: np.ndarray, percentile: float) -> tuple[np.ndarray, float, float]:
    r"""MR intensities: clip above the volume's `percentile`-th percentile, then (x - min) / (clip - min) -> float32
    in [0, 1]. Returns (volume, min, clip value)."""
    clip = float(np.percentile(image, percentile))
    image = np.minimum(image.astype(np.float64), clip)
    lo = float(image.min())
    out = (image - lo) / (clip - lo) if clip > lo else np.zeros_like(image)
    return out.astype(np.float32), lo, clip


class PreparedVolumes(CheckedDataset):
    r"""A benchmark read from a prepared cache of volumes; 2D episodes and the volumetric protocol's accessors.

    Subclasses declare (besides `name`, `options`, `protocols`, `layout`) the class attributes below and implement
    `find_raw_root`, `iter_raw` and `prepare_volume` (classmethods, so the preparation needs no dataset object).
    """
    domain = 'target'
    splits = ('test',)
    #: Class names, ids 1..C in the cached labels, in this order.
    volume_classes: tuple[str, ...] = ()
    title = ''                  # in messages about the cache ('the CHAOS cache')
    raw_title = ''              # in messages about the raw folder ('no raw CHAOS MR folder')
    raw_format = ''             # 'DICOM' / 'NIfTI'
    raw_roots: tuple[str, ...] = ()    # raw roots under --datapath, the first one named in errors
    raw_also = ''               # the other accepted spellings, for the layout error
    raw_layout = ''             # the expected raw layout (errors)
    cache_subdir = ''           # default cache, relative to --datapath
    cache_option = ''           # the benchmark's option naming another cache folder
    prepare_script = ''         # scripts/prepare_<benchmark>.py
    prep_format = ''
    prep_version = 1
    preprocessing = ''          # one line for the manifest and the report

    # --- the raw layout (classmethods: used by `prepare_cache` without a dataset) --------------------------------
    @classmethod
    def default_cache_dir(cls, datapath: Path | str) -> Path:
        return Path(datapath) / cls.cache_subdir

    @classmethod
    def prepare_command(cls, datapath: Path | str, out: Path | None = None) -> str:
        cmd = f'python {cls.prepare_script} --datapath {datapath}'
        return cmd + (f' --out {out}' if out is not None and Path(out) != cls.default_cache_dir(datapath) else '')

    @classmethod
    def find_raw_root(cls, datapath: Path) -> Path | None:
        r"""The raw root under `datapath`, or None."""
        raise NotImplementedError

    @classmethod
    def iter_raw(cls, raw_root: Path, report: DataReport):
        r"""Yield the usable raw volumes (objects with `pid`, `image` and `label` [D,H,W] class ids) one at a time;
        problems go to `report`, keyed by the volume id."""
        raise NotImplementedError

    @classmethod
    def prepare_volume(cls, vol) -> tuple[np.ndarray, np.ndarray, dict]:
        r"""(image float32 [D,H,W] in [0, 1], label uint8 [D,H,W], fields for the manifest entry) of a raw volume."""
        raise NotImplementedError

    @classmethod
    def manifest_fields(cls) -> dict:
        r"""Benchmark-specific top-level manifest fields."""
        return {}

    @classmethod
    def summary_lines(cls, manifest: dict) -> list[str]:
        r"""Benchmark-specific lines of the preparation's summary (scripts/prepare_<benchmark>.py)."""
        return []

    @classmethod
    def new_report(cls, root: Path, full: bool = True) -> DataReport:
        report = DataReport(cls.name, root, full)
        report.class_names, report.class_items = list(cls.volume_classes), [[] for _ in cls.volume_classes]
        return report

    @classmethod
    def scan_raw(cls, raw_root: Path, report: DataReport, on_volume=None) -> None:
        r"""Read every raw volume under `raw_root` into `report` (class items: slices 'pid/zzz' holding the class);
        each usable volume is handed to `on_volume` and then released, so only one is in memory at a time."""
        for vol in cls.iter_raw(raw_root, report):
            for c in range(len(cls.volume_classes)):
                report.class_items[c].extend(f'{vol.pid}/{z:03d}' for z in class_slices(vol.label, c + 1))
            if on_volume is not None:
                on_volume(vol)

    # --- the dataset ------------------------------------------------------------------------------------------------
    def configure(self, **options) -> None:
        cache = options.pop(self.cache_option, None)
        if options:
            raise TypeError(f'unexpected options {sorted(options)}')
        self.cache_dir = Path(cache).expanduser() if cache else self.default_cache_dir(self.datapath)

    def rebuild_command(self) -> str:
        return self.prepare_command(self.datapath, self.cache_dir) + ' --overwrite'

    def repair_hint(self) -> str:
        return f'rebuild the cache with `{self.rebuild_command()}`'

    def read_manifest(self) -> dict:
        path = self.cache_dir / MANIFEST
        if not path.is_file():
            raw = self.find_raw_root(self.datapath)
            if raw is None:
                raise layout_error(self, self.datapath / self.raw_roots[0],
                                   also=f'{self.raw_also} and a prepared cache')
            raise UserError(f'{self.name}: the prepared cache {path} does not exist. Prepare it once from the '
                            f'{self.raw_format} files in {raw} with:\n  '
                            f'{self.prepare_command(self.datapath, self.cache_dir)}')
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f'{self.name}: {path} is unreadable ({err}); rebuild it with '
                            f'`{self.rebuild_command()}`') from err
        if manifest.get('format') != self.prep_format or manifest.get('version') != self.prep_version:
            raise UserError(f'{self.name}: {path} was written by another version of the preparation (format '
                            f'{manifest.get("format")!r} v{manifest.get("version")}, expected {self.prep_format!r} '
                            f'v{self.prep_version}); rebuild it with `{self.rebuild_command()}`')
        return manifest

    def scan(self, full: bool) -> DataReport:
        classes = self.volume_classes
        raw = self.find_raw_root(self.datapath)
        if full and raw is not None and not (self.cache_dir / MANIFEST).is_file():
            # The checker on raw data that is not prepared yet: report on the raw files, and the missing cache.
            report = self.new_report(raw)
            self.scan_raw(raw, report)
            report.add('missing', self.cache_dir / MANIFEST, 'the prepared cache does not exist yet; build it with '
                       f'`{self.prepare_command(self.datapath, self.cache_dir)}`')
            return report
        manifest = self.read_manifest()
        report = self.new_report(self.cache_dir, full)
        self._volumes: dict[str, dict] = {}
        for entry in manifest['volumes']:
            pid, ok = entry['pid'], True
            for role in ('image', 'label'):
                path = self.cache_dir / entry[role]
                report.files_checked += 1
                try:
                    arr = np.load(path, mmap_mode='r')
                    if list(arr.shape) != entry['shape']:
                        raise ValueError(f'shape {list(arr.shape)} but the manifest says {entry["shape"]}')
                    if full:
                        values = np.asarray(arr)
                        if role == 'label' and values.max(initial=0) > len(classes):
                            raise ValueError(f'organ ids up to {values.max()} (expected 0-{len(classes)})')
                        if role == 'image' and not (np.isfinite(values).all() and values.min() >= 0
                                                    and values.max() <= 1):
                            raise ValueError('intensities outside [0, 1] or not finite')
                except FileNotFoundError:
                    report.add('missing', path, 'listed in the manifest', pid)
                    ok = False
                except (OSError, ValueError) as err:
                    report.add('unreadable', path, str(err), pid)
                    ok = False
            if not ok:
                continue
            self._volumes[pid] = entry
            for c, name in enumerate(classes):
                report.class_items[c].extend(f'{pid}/{z:03d}' for z in entry['organ_slices'][name])
        report.notes.append(f'{len(manifest["volumes"])} prepared volumes from {manifest.get("raw_root")} '
                            f'({manifest.get("created")}); {manifest.get("preprocessing")}')
        if manifest.get('skipped'):
            report.warnings.append(f'patients left out at preparation (--skip-bad): {", ".join(manifest["skipped"])}')
        if full and raw is not None:
            raw_report = self.new_report(raw)
            self.scan_raw(raw, raw_report)
            report.files_checked += raw_report.files_checked
            report.notes.append(f'raw {self.raw_format} layout {raw} re-read: {len(raw_report.problems)} problems')
            report.notes.extend(raw_report.notes)
            for p in raw_report.problems:
                report.add(p.kind, p.path, p.detail, None, p.hard)
            report.warnings.extend(raw_report.warnings)
        bad = report.bad_keys()
        for c, name in enumerate(classes):
            patients = {k.split('/')[0] for k in report.class_items[c] if k.split('/')[0] not in bad}
            report.notes.append(f'{name}: {len(report.class_items[c])} slices in {len(patients)} volumes')
            if 0 < len(patients) < 2:
                report.warnings.append(f'{name} appears in a single patient: 2D episodes need a support from another '
                                       'patient, so the class is left out')
                report.class_items[c] = []
        return report

    # --- slices ---------------------------------------------------------------------------------------------------
    @staticmethod
    def split_key(key: str) -> tuple[str, int]:
        pid, z = key.rsplit('/', 1)
        return pid, int(z)

    def _array(self, pid: str, role: str) -> np.ndarray:
        path = self.cache_dir / self._volumes[pid][role]
        try:
            return np.load(path, mmap_mode='r')
        except (OSError, ValueError) as err:
            raise UserError(f'{self.name}: cannot read {path} ({err}); rebuild the cache with '
                            f'`{self.rebuild_command()}`') from err

    def slice_image(self, pid: str, z: int) -> Image.Image:
        r"""Slice z as an 8-bit RGB image: round(255 x normalised intensity), replicated to 3 channels."""
        values = np.asarray(self._array(pid, 'image')[z], dtype=np.float32)
        gray = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(gray).convert('RGB')         # uint8 2D -> mode L

    def slice_label(self, pid: str, z: int) -> np.ndarray:
        return np.asarray(self._array(pid, 'label')[z], dtype=np.uint8)

    def read_image(self, key):
        return self.slice_image(*self.split_key(key))

    def read_mask(self, key, class_id):
        return (self.slice_label(*self.split_key(key)) == class_id + 1).astype(np.uint8)

    def sample_supports(self, rng, class_id, query):
        r"""K supports of the class from patients other than the query's (distinct when enough exist)."""
        patient = self.split_key(query)[0]
        others = [k for k in self.class_items[class_id] if self.split_key(k)[0] != patient]
        picks = rng.choice(len(others), size=self.nshot, replace=len(others) < self.nshot)
        return tuple(others[i] for i in picks)

    # --- volumetric protocol ------------------------------------------------------------------------------------
    @property
    def volumes(self) -> list[str]:
        r"""Patient ids of the usable prepared volumes, sorted numerically (the order the folds index)."""
        return sorted(self._volumes, key=pid_order)

    def organ_slices(self, pid: str, class_id: int) -> list[int]:
        r"""Slice indices (position order) of volume `pid` that contain organ `class_id` (0-based)."""
        return list(self._volumes[pid]['organ_slices'][self.volume_classes[class_id]])

    def load_slice(self, pid: str, z: int, class_id: int):
        r"""(image [3,S,S] normalised, binary mask [S,S] uint8, binary mask at the prepared grid [H,W] uint8)."""
        native = (self.slice_label(pid, z) == class_id + 1).astype(np.uint8)
        return self.transform_image(self.slice_image(pid, z)), self.transform_mask(native), native


# --- preparation --------------------------------------------------------------------------------------------------
def prepare_cache(cls: type[PreparedVolumes], datapath: Path | str, out: Path | str | None = None,
                  skip_bad: bool = False, overwrite: bool = False) -> Path:
    r"""Build the prepared cache of benchmark `cls` from its raw layout; returns the cache folder."""
    datapath = Path(datapath)
    raw_root = cls.find_raw_root(datapath)
    if raw_root is None:
        raise UserError(f'{cls.name}: no raw {cls.raw_title} folder under {datapath} (looked for '
                        f'{", ".join(str(datapath / r) for r in cls.raw_roots)}).\nExpected layout under --datapath:\n'
                        f'{cls.raw_layout}')
    out = Path(out) if out else cls.default_cache_dir(datapath)
    if (out / MANIFEST).is_file() and not overwrite:
        raise UserError(f'{out} already holds a prepared {cls.title} cache; pass --overwrite to rebuild it')
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{cls.name}-prepare-', dir=out.parent))
    except OSError as err:
        raise UserError(f'cannot write the {cls.title} cache to {out} ({err}); pass a writable --out') from err
    entries = []

    def write(vol) -> None:
        image, label, fields = cls.prepare_volume(vol)
        np.save(tmp / f'image_{vol.pid}.npy', image)
        np.save(tmp / f'label_{vol.pid}.npy', label)
        entries.append({'pid': vol.pid, 'image': f'image_{vol.pid}.npy', 'label': f'label_{vol.pid}.npy',
                        'shape': list(label.shape), **fields,
                        'organ_slices': {name: class_slices(label, c) for c, name in enumerate(cls.volume_classes, 1)}})

    try:
        report = cls.new_report(raw_root)
        cls.scan_raw(raw_root, report, on_volume=write)
        for message in report.warnings:
            warnings.warn(f'{cls.name}: {message}', stacklevel=3)
        if report.hard:
            if not skip_bad or any(p.key is None for p in report.hard):
                raise UserError(report.error_message(cls.raw_layout, f'python scripts/check_data.py --benchmark '
                                                                     f'{cls.name} --datapath {datapath}'))
            warnings.warn(f'{cls.name}: --skip-bad left out patients '
                          f'{", ".join(sorted(report.bad_keys(), key=pid_order))} ({report.summary(hard=True)})',
                          stacklevel=3)
        if not entries:
            raise UserError(f'{cls.name}: no usable patient under {raw_root}.\nExpected layout:\n{cls.raw_layout}')
        write_json_atomic(tmp / MANIFEST, {
            'format': cls.prep_format, 'version': cls.prep_version, 'created': time.strftime('%Y-%m-%d %H:%M:%S'),
            'raw_root': str(raw_root.resolve()), 'classes': list(cls.volume_classes), **cls.manifest_fields(),
            'preprocessing': cls.preprocessing, 'skipped': sorted(report.bad_keys(), key=pid_order),
            'volumes': entries})
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except OSError as err:
        raise UserError(f'cannot write the {cls.title} cache to {out} ({err}); pass a writable --out') from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_parser(cls: type[PreparedVolumes], description: str, datapath_help: str) -> argparse.ArgumentParser:
    r"""The command line of scripts/prepare_<benchmark>.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--datapath', required=True, help=datapath_help)
    flag = '--' + cls.cache_option.replace('_', '-')
    p.add_argument('--out', default=None,
                   help=f'cache folder (default <datapath>/{cls.cache_subdir}; elsewhere: pass the same folder to '
                        f'test.py {flag})')
    p.add_argument('--overwrite', action='store_true', help='rebuild an existing cache')
    p.add_argument('--skip-bad', action='store_true',
                   help='leave out patients with missing, unreadable or mislabelled files (with a warning) instead '
                        'of stopping')
    return p


def prepare_main(cls: type[PreparedVolumes], args: argparse.Namespace) -> dict:
    r"""Prepare the cache from parsed `prepare_parser` flags and print a summary; returns the manifest."""
    out = prepare_cache(cls, args.datapath, args.out, skip_bad=args.skip_bad, overwrite=args.overwrite)
    manifest = json.loads((out / MANIFEST).read_text())
    vols = manifest['volumes']
    slices = sum(v['shape'][0] for v in vols)
    print(f'prepared {len(vols)} volumes ({slices} slices) from {manifest["raw_root"]} into {out}')
    for name in cls.volume_classes:
        n = sum(len(v['organ_slices'][name]) for v in vols)
        print(f'  {name}: {n} slices in {sum(bool(v["organ_slices"][name]) for v in vols)} volumes')
    for line in cls.summary_lines(manifest):
        print(line)
    print(f'preprocessing: {manifest["preprocessing"]}')
    if manifest['skipped']:
        print(f'left out (--skip-bad): patients {", ".join(manifest["skipped"])}')
    cache = f' --{cls.cache_option.replace("_", "-")} {out}' if args.out else ''
    print(f'next: python test.py --benchmark {cls.name} --datapath {args.datapath}{cache} --load CKPT '
          '[--protocol volumetric]')
    return manifest
