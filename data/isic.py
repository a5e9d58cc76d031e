r"""ISIC 2018 Task 1 (training split, 2,594 dermoscopy images) with three diagnosis classes from a class CSV.

Layout: the official flat folders; PATNet's hand-sorted `ISIC2018_Task1-2_Training_Input/{1,2,3}/` is accepted too
(the flat originals win when both exist). Classes come, in this order of preference, from
  1. `--isic-classes FILE`, a CSV `ID,Class` (CRLF or LF, optional BOM, `seborrheic_keratosis` or with a space);
  2. `--isic-classes "NAME1,NAME2,NAME3"`: the diagnoses of the class folders 1, 2, 3 (the sorting scripts in the
     PATNet family disagree on this order, so it is never guessed);
  3. `<root>/class_id.csv` (the file shipped with PATNet, DMTNet, IFA and CD-TG);
  4. otherwise one class, "lesion", with a warning.
Class names are plain lowercase diagnoses so text descriptions are keyed by name, never by folder number.
Masks are 0/255 and binarised at >= 128 (PATNet protocol).
"""
import csv
import re
from pathlib import Path


from common.errors import UserError
from data.checks import (CheckedDataset, DataReport, check_pair, find_dataset_root, list_files)

CLASSES = ['melanoma', 'nevus', 'seborrheic keratosis']
SINGLE_CLASS = 'lesion'
ALIASES = {'naevus': 'nevus', 'seborrhoeic keratosis': 'seborrheic keratosis'}
IMG_DIR = 'ISIC2018_Task1-2_Training_Input'
GT_DIR = 'ISIC2018_Task1_Training_GroundTruth'
ROOTS = ('ISIC2018', 'ISIC')
MASK_SUFFIX = '_segmentation'
_HEADER_WORDS = {'id', 'image', 'image_id', 'image id', 'isic_id', 'name', 'class', 'label', 'diagnosis', 'dx'}


def normalise_class(label: str) -> str:
    r"""'Seborrheic_Keratosis ' -> 'seborrheic keratosis'."""
    name = re.sub(r'[\s_\-]+', ' ', label.strip().lower()).strip()
    return ALIASES.get(name, name)


def read_class_csv(path: Path) -> dict[str, str]:
    r"""ISIC id -> class name from an `ID,Class` CSV (BOM, CRLF, a header row and blank lines tolerated)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f'isic: cannot read the class file {path} ({err})') from err
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError:
        text = raw.decode('latin-1')
    lines = text.splitlines()                      # handles CRLF, LF and CR
    sample = next((ln for ln in lines if ln.strip()), '')
    delimiter = ',' if ',' in sample else (';' if ';' in sample else '\t')
    table: dict[str, str] = {}
    first = True
    for line_no, row in enumerate(csv.reader(lines, delimiter=delimiter), 1):
        cells = [c.strip().strip('\ufeff') for c in row]
        if not any(cells):
            continue
        if len(cells) < 2 or not cells[0]:
            raise UserError(f'isic: {path}:{line_no}: expected "ID,Class" (e.g. "ISIC_0000000,nevus"), got '
                            f'{delimiter.join(row)!r}')
        ident, label = cells[0], normalise_class(cells[1])
        if label not in CLASSES:
            if first and (cells[0].lower() in _HEADER_WORDS or cells[1].lower() in _HEADER_WORDS):
                first = False
                continue
            raise UserError(f'isic: {path}:{line_no}: unknown class {cells[1]!r}; expected one of melanoma, nevus, '
                            'seborrheic_keratosis (or "seborrheic keratosis")')
        first = False
        ident = Path(ident).stem if ident.lower().endswith(('.jpg', '.jpeg', '.png')) else ident
        if table.get(ident, label) != label:
            raise UserError(f'isic: {path}:{line_no}: {ident} is listed as both {table[ident]!r} and {label!r}')
        table[ident] = label
    if not table:
        raise UserError(f'isic: the class file {path} lists no image (expected lines "ISIC_0000000,nevus")')
    return table


class ISIC(CheckedDataset):
    r"""ISIC 2018 Task 1 training images with the diagnosis of each image as its few-shot class."""
    name = 'isic'
    domain = 'target'
    splits = ('test',)
    options = {'isic_classes': 'class CSV "ID,Class" (default ISIC2018/class_id.csv), or the diagnoses of the class '
                               'folders 1,2,3 in order, e.g. "nevus,melanoma,seborrheic keratosis"'}
    layout = (f'  ISIC2018/   (or ISIC/, or --datapath pointing at this folder itself)\n'
              f'    {IMG_DIR}/ISIC_0000000.jpg ...        (PATNet-style class folders 1/ 2/ 3/ also accepted)\n'
              f'    {GT_DIR}/ISIC_0000000_segmentation.png ...   (0/255)\n'
              f'    class_id.csv   ("ID,Class" with nevus | melanoma | seborrheic_keratosis; or --isic-classes FILE)')

    def configure(self, isic_classes: str | None = None) -> None:
        self.isic_classes = isic_classes

    def find_root(self) -> Path:
        return find_dataset_root(self, ROOTS, (IMG_DIR, GT_DIR))

    def scan(self, full: bool) -> DataReport:
        root = self.find_root()
        report = DataReport(self.name, root, full)
        img_dir, gt_dir = root / IMG_DIR, root / GT_DIR
        images, folder_of = self._find_images(img_dir, report)
        masks = {}
        for p in list_files(gt_dir, ('.png',)):
            if p.stem.endswith(MASK_SUFFIX):
                masks[p.stem[:-len(MASK_SUFFIX)]] = p
        if not masks:
            raise UserError(f'isic: no *{MASK_SUFFIX}.png mask in {gt_dir}.\nExpected layout under --datapath '
                            f'{self.datapath}:\n{self.layout}')
        names, assign = self._resolve_classes(root, folder_of, report)
        expected = set(assign) if assign is not None else set(images)
        self._paths: dict[str, tuple[Path, Path]] = {}
        items: list[list[str]] = [[] for _ in names]
        for ident in sorted(expected):
            image, mask = images.get(ident), masks.get(ident)
            if image is None and mask is None:
                report.add('missing', img_dir / f'{ident}.jpg', 'listed in the class file, but neither the image '
                           'nor its mask exists', ident)
                continue
            if image is None:
                report.add('mask_without_image', mask, f'image {img_dir / (ident + ".jpg")} is missing', ident)
                continue
            if mask is None:
                report.add('image_without_mask', image, f'mask {gt_dir / (ident + MASK_SUFFIX + ".png")} is missing',
                           ident)
                continue
            check_pair(report, ident, image, mask, full, allowed=(0, 255))
            self._paths[ident] = (image, mask)
            items[names.index(assign[ident]) if assign is not None else 0].append(ident)
        for ident in sorted(set(images) - expected):
            report.add('unclassified', images[ident], 'not in the class file; not used', hard=False)
        for ident in sorted(set(masks) - set(images) - expected):
            report.add('mask_without_image', masks[ident], 'no image and no class; not used', hard=False)
        if folder_of and any(p.kind == 'size_mismatch' for p in report.hard):
            report.notes.append('the images in the class folders differ in size from their masks: these are resized '
                                "copies (CD_TG's ISIC_Split.py saves 512x512 copies); use the original flat "
                                f'{IMG_DIR}/*.jpg instead')
        report.class_names, report.class_items = names, items
        return report

    def _find_images(self, img_dir: Path, report: DataReport) -> tuple[dict[str, Path], dict[str, int]]:
        r"""id -> image path, and id -> class folder number for PATNet's hand-sorted layout ({} for the flat one)."""
        ext = ('.jpg', '.jpeg')
        flat = {p.stem: p for p in list_files(img_dir, ext)}
        folders = {n: img_dir / str(n) for n in (1, 2, 3) if (img_dir / str(n)).is_dir()}
        if flat:
            if folders:
                report.notes.append(f'class folders {", ".join(map(str, folders))} in {img_dir} are ignored: the flat '
                                    'original images are used')
            return flat, {}
        if not folders:
            raise UserError(f'isic: no ISIC_*.jpg image in {img_dir} (nor class folders 1/ 2/ 3/).\nExpected layout '
                            f'under --datapath {self.datapath}:\n{self.layout}')
        images, folder_of = {}, {}
        for n, folder in folders.items():
            for p in list_files(folder, ext):
                if p.stem in images:
                    report.add('other', p, f'also in class folder {folder_of[p.stem]}; ambiguous class', p.stem)
                    continue
                images[p.stem], folder_of[p.stem] = p, n
        report.notes.append(f'images read from the class folders {", ".join(map(str, folders))} of {img_dir}')
        return images, folder_of

    def _resolve_classes(self, root: Path, folder_of: dict[str, int], report: DataReport
                         ) -> tuple[list[str], dict[str, str] | None]:
        r"""Class names and id -> class (None: the single class 'lesion' for every image)."""
        value = self.isic_classes
        if value:
            path = Path(value).expanduser()
            if path.is_file():
                report.notes.append(f'classes from {path}')
                return list(CLASSES), read_class_csv(path)
            if ',' not in value:
                raise UserError(f'isic: --isic-classes {value}: no such file. Give the class CSV ("ID,Class", e.g. '
                                "PATNet's data/isic/class_id.csv) or, for the class folders 1/ 2/ 3/, their diagnoses "
                                'in folder order, e.g. --isic-classes "nevus,melanoma,seborrheic keratosis"')
            order = [normalise_class(n) for n in value.split(',')]
            if sorted(order) != sorted(CLASSES):
                raise UserError(f'isic: --isic-classes {value!r} must name each of melanoma, nevus, seborrheic '
                                'keratosis once, in the order of the class folders 1, 2, 3')
            if not folder_of:
                raise UserError(f'isic: --isic-classes {value!r} names class folders, but {root / IMG_DIR} has no '
                                'class folders 1/ 2/ 3/ (or also holds the flat images, which are used); give the '
                                'class CSV instead')
            report.notes.append(f'classes from the folders: {", ".join(f"{i + 1}={n}" for i, n in enumerate(order))}')
            return list(CLASSES), {ident: order[n - 1] for ident, n in folder_of.items()}
        default = root / 'class_id.csv'
        if default.is_file():
            report.notes.append(f'classes from {default}')
            return list(CLASSES), read_class_csv(default)
        hint = (' The class folders 1/ 2/ 3/ are not used because the preprocessing scripts number them differently; '
                'name them with --isic-classes "NAME1,NAME2,NAME3".' if folder_of else '')
        report.warnings.append(f'no class information ({default} not found, no --isic-classes): every image is one '
                               f'class "{SINGLE_CLASS}". Put the ISIC class CSV there (ID,Class; shipped as '
                               f'data/isic/class_id.csv in slei109/PATNet) for the three diagnosis classes.{hint}')
        return [SINGLE_CLASS], None

