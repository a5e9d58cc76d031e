r"""COCO-20i on COCO 2014 in the HSNet layout, with folds 0-3 and an all-80-classes mode.

Fold f holds out the classes {f, f+4, ..., f+76} (HSNet). Image lists come either from HSNet's split pickles
(`--split-file DIR` with `{trn,val}/fold{0..3}.pkl`, each a dict class -> ['train2014/COCO_train2014_....jpg', ...])
or from the masks with the same rule as PASCAL (a pair is kept when the class covers >= 2048 pixels), trn from
train2014 and val from val2014; derived lists are cached. Mask value = class index + 1; there is no ignore label.
"""
import pickle
from pathlib import Path


from common.errors import UserError
from data.episodic import cache_file, open_image, read_json, write_json_atomic
from data.pascal import MIN_PIXELS, FoldedDataset, class_mask, scan_masks

CLASSES = ['person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
           'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
           'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
           'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
           'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
           'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
           'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
           'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
           'teddy bear', 'hair drier', 'toothbrush']
LIST_VERSION = 1


class PlainUnpickler(pickle.Unpickler):
    r"""Unpickles plain containers only (dict, list, tuple, str, numbers): a split file that names any class or
    function (which a crafted pickle needs to run code) is refused before anything is called."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'it refers to {module}.{name}; only plain lists and dicts are accepted')


class COCO(FoldedDataset):
    r"""COCO-20i (optional source domain)."""
    name = 'coco'
    classes = CLASSES
    layout = ('  COCO2014/train2014/COCO_train2014_000000000009.jpg ...\n'
              '  COCO2014/val2014/COCO_val2014_000000000042.jpg ...\n'
              '  COCO2014/annotations/train2014/COCO_train2014_000000000009.png ...   (HSNet masks: class index + 1)\n'
              '  COCO2014/annotations/val2014/COCO_val2014_000000000042.png ...')

    @property
    def root(self) -> Path:
        return self.datapath / 'COCO2014'

    @property
    def subset(self) -> str:
        return 'train2014' if self.split == 'trn' else 'val2014'

    def held_out(self, fold: int) -> list[int]:
        return [fold + self.nfolds * v for v in range(len(CLASSES) // self.nfolds)]

    def required_dirs(self) -> list[Path]:
        return [self.root / self.subset, self.root / 'annotations' / self.subset]

    def _split_file_pairs(self) -> list[tuple[str, int]]:
        folds = range(self.nfolds) if self.fold == 'all' else [self.fold]
        pairs = []
        for f in folds:
            path = self.split_file / self.split / f'fold{f}.pkl'
            if not path.is_file():
                raise UserError(f'--split-file {self.split_file}: {path} is missing (expected HSNet split pickles '
                                '{trn,val}/fold{0..3}.pkl)')
            try:
                with open(path, 'rb') as fh:
                    table = PlainUnpickler(fh).load()
                pairs += [(str(n).rsplit('.', 1)[0], int(c)) for c, names in table.items() for n in names]
            except Exception as err:  # noqa: BLE001 - any malformed pickle gets the same message
                raise UserError(f'{path} is not an HSNet COCO split pickle (dict class -> image names): {err}') from err
        return pairs

    def _derived_pairs(self) -> list[tuple[str, int]]:
        cache = cache_file(self, self.root, f'coco_lists_v{LIST_VERSION}_{self.subset}_min{MIN_PIXELS}.json')
        if cache.is_file():
            return [(n, c) for n, c in read_json(cache)]
        mask_dir = self.root / 'annotations' / self.subset
        names = sorted(p.stem for p in mask_dir.glob('*.png'))
        if not names:
            raise UserError(f'coco: no masks in {mask_dir}.\nExpected layout under --datapath {self.datapath}:\n'
                            f'{self.layout}')
        counts = scan_masks(mask_dir, names, len(CLASSES), f'indexing coco/{self.subset}')
        pairs = [(f'{self.subset}/{n}', c) for n in names for c, px in enumerate(counts[n]) if px >= MIN_PIXELS]
        write_json_atomic(cache, pairs)
        return pairs

    def read_image(self, key):
        return open_image(self.root / f'{key}.jpg')

    def read_mask(self, key, class_id):
        return class_mask(self.root / 'annotations' / f'{key}.png', class_id, len(CLASSES))
