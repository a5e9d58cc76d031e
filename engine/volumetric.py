r"""The volumetric few-shot protocol of the volumetric benchmarks (`test.py --protocol volumetric`; chaos, abd-ct,
cmr: the registry classes whose `protocols` include 'volumetric'): Q-Net's evaluation (ZJLAB-AMMI/Q-Net test.py
with scripts/val.sh, `supp_idx = 2`), and SSL-ALPNet's support choice as an option.

For the N volumes sorted by patient id:
  * 5 folds; fold f takes max(5, N // 5 + 1) volumes (at most N) from floor(f N / 5) on, wrapping around
    (consecutive folds share a volume). This is Q-Net's dataloaders/dataset_specifics.py `get_folds` for its three
    sets: CHAOS-T2 (20) {0-4}, {4-8}, {8-12}, {12-16}, {16-19, 0}; SABS / ABD-CT (30) {0-6}, {6-12}, {12-18},
    {18-24}, {24-29, 0}; CMR (35) {0-7}, {7-14}, {14-21}, {21-28}, {28-34, 0}; for N <= 24 folds of 5. Identical
    folds are evaluated once; N < 2 is an error;
  * the support volume (`--volumetric-support`, `SUPPORT_RULES`):
      - 'qnet' (default): Q-Net lists a fold's volumes in index order (CHAOS fold 4 is [0, 16, 17, 18, 19]) and
        takes the one at position 2 (`SUPPORT_POSITION`, its scripts' `supp_idx`, used here for every set): CHAOS 2, 6,
        10, 14, 17; ABD-CT 2, 8, 14, 20, 25; CMR 2, 9, 16, 23, 29;
      - 'ssl-alpnet': SSL-ALPNet (cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation) validates fold f
        on the scans `_SEP[f]` .. `_SEP[f+1]` plus the next one and takes that extra scan as the support
        (`SUPP_ID='[4]'` in examples/test_ssl_abdominal_mri.sh with `_SEP` 0, 4, ... 20; `SUPP_ID='[6]'` in
        test_ssl_abdominal_ct.sh with `_SEP` 0, 6, ... 30): the fold's last volume in circular order, the one it
        shares with the next fold: CHAOS volumes 4, 8, 12, 16, 0; ABD-CT 6, 12, 18, 24, 0 (both exactly
        SSL-ALPNet's); CMR 7, 14, 21, 28, 0 (the same rule; SSL-ALPNet has no cardiac set);
    the other volumes of the fold are the queries (SSL-ALPNet's folds have the same members; its validation also
    counts slices within a `z_margin` of the organ's range and z-scores each volume; only its support choice is
    offered here);
  * each organ is a separate binary task. Only the query slices that contain the organ are evaluated (the ground
    truth selects them; this is part of the protocol). They are split into 3 chunks at
    `linspace(0, C_q, 4).astype(int)`;
  * 1-shot: chunk j uses the support's organ slice at relative position 1/6, 1/2, 5/6 of its organ slices
    (index int(p * C_s), Q-Net's `get_support_index(3, C_s)`);
  * K-shot (our definition; the papers only run 1-shot): the support's organ range is cut into 3K equal parts and
    chunk j uses the centres of parts jK .. jK+K-1, i.e. K slices at relative positions (j + (k + 1/2) / K) / 3,
    k < K: chunk j's third of the support organ, spread evenly. This is `get_support_index(3K, C_s)` grouped by
    chunk, so K = 1 is exactly the 1-shot rule. With few support organ slices positions can repeat;
  * score: 3D Dice 2TP / (2TP + FP + FN) over the evaluated slices of one query volume, at the prepared grid of
    the volume (the binary prediction is resized back from --img-size with nearest neighbour); averaged over the
    query volumes of a fold, then over the folds, per organ; the reported Dice is the mean over organs (all of
    them, an organ never evaluated counting 0, or only the evaluated ones: `miou_over`). mIoU is the same average of the
    per-volume 3D IoU; FB-IoU pools background and foreground I/U over all evaluated slices.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import UserError
from common.metrics import metric_record
from common.names import SUPPORT_RULES
from engine.loops import Runtime, autocast

N_FOLDS = 5
FOLD_SIZE = 5
SUPPORT_POSITION = 2
N_PART = 3


def fold_size(n_volumes: int) -> int:
    r"""Volumes per fold: max(5, N // 5 + 1), at most N (5 for CHAOS's 20, 7 for ABD-CT's 30, 8 for CMR's 35)."""
    return min(n_volumes, max(FOLD_SIZE, n_volumes // N_FOLDS + 1))


def volumetric_folds(n_volumes: int) -> list[list[int]]:
    r"""Fold members (indices into the sorted volumes), each in index order: fold f holds `fold_size` volumes from
    floor(f N / 5) on, wrapping (Q-Net's folds for 20, 30 and 35 volumes)."""
    if n_volumes < 2:
        raise UserError(f'the volumetric protocol needs at least 2 prepared volumes (got {n_volumes}); CHAOS T2-SPIR '
                        'has 20, ABD-CT 30, CMR 35')
    folds = []
    size = fold_size(n_volumes)
    for f in range(N_FOLDS):
        start = f * n_volumes // N_FOLDS
        members = sorted({(start + j) % n_volumes for j in range(size)})
        if members not in folds:
            folds.append(members)
    return folds


def support_position(fold: list[int]) -> int:
    r"""Q-Net: position of the support volume within a fold (2, or the last one for folds of fewer than 3)."""
    return min(SUPPORT_POSITION, len(fold) - 1)


def support_volume(fold: list[int], n_volumes: int, rule: str = 'qnet') -> int:
    r"""The support volume (an index into the sorted volumes) of a fold of `volumetric_folds(n_volumes)`.

    'qnet': the fold's volume at `support_position` in index order. 'ssl-alpnet': its last volume in circular
    order from the fold's start, floor(f N / 5) + fold_size - 1 (mod N) for fold f: the volume shared with the next
    fold (+4 for CHAOS, +6 for ABD-CT, +7 for CMR).
    """
    if rule not in SUPPORT_RULES:
        raise UserError(f'--volumetric-support must be one of {", ".join(SUPPORT_RULES)} (got {rule!r})')
    if rule == 'qnet':
        return fold[support_position(fold)]
    size = len(fold)
    # the start is the member whose circular run of `size` volumes is the fold
    start = next(v for v in fold if {(v + j) % n_volumes for j in range(size)} == set(fold))
    return (start + size - 1) % n_volumes


def support_slice_indices(n_organ_slices: int, nshot: int, n_part: int = N_PART) -> list[list[int]]:
    r"""For each chunk, the K indices into the support's organ slices (Q-Net get_support_index(n_part*K, C))."""
    n = n_part * nshot
    if n == 1:
        pcts = [0.5]
    else:
        half_part = 1 / (n * 2)
        part_interval = (1.0 - 1.0 / n) / (n - 1)
        pcts = [half_part + part_interval * i for i in range(n)]
    idx = (np.array(pcts) * n_organ_slices).astype('int')
    return [idx[j * nshot:(j + 1) * nshot].tolist() for j in range(n_part)]


def chunk_bounds(n_query_slices: int, n_part: int = N_PART) -> list[int]:
    r"""Chunk j of the query's organ slices is [bounds[j], bounds[j+1]) (Q-Net: linspace(0, C, n+1).astype(int))."""
    return np.linspace(0, n_query_slices, n_part + 1).astype('int').tolist()


def _stack_supports(dataset, pid: str, chunks: list[list[int]], class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The support slices of every chunk: images [n_chunks,K,3,S,S] and masks [n_chunks,K,S,S]."""
    shots = [[dataset.load_slice(pid, z, class_id) for z in zs] for zs in chunks]
    return (torch.stack([torch.stack([s[0] for s in zs]) for zs in shots]),
            torch.stack([torch.stack([s[1] for s in zs]) for zs in shots]))


@torch.no_grad()
def evaluate_volumetric(model, dataset, runtime: Runtime | torch.device, nshot: int, bsz: int = 1,
                        desc: str = 'volumetric', support_rule: str = 'qnet',
                        miou_over: str = 'all') -> tuple[dict, list[dict]]:
    r"""Run the protocol on a dataset exposing `volumes`, `organ_slices(pid, c)`, `load_slice(pid, z, c)` and
    `class_names`. Returns (scores, tasks): scores in percent with the keys of `SegmentationMeter.compute` plus
    'per_fold'; one task per (fold, organ, query volume). The 3 chunks' support slices are encoded once per
    (fold, organ) and serve every query slice; query slices are batched `bsz` at a time across chunks and query
    volumes, each with its own chunk's supports, and predicted through the test-time entry point `model.infer`
    (methods with per-episode adaptation adapt there). `support_rule`: which volume of a fold is the support
    (`support_volume`); `miou_over`: whether organs never evaluated count 0 in the means (see `summarise`). In a
    distributed run (`runtime.dist`) the (fold, organ) tasks are dealt out to the processes round robin and their
    results gathered, so every process returns the same scores."""
    runtime = Runtime.of(runtime)
    dist = runtime.dist
    model.eval()
    volumes = dataset.volumes
    folds = volumetric_folds(len(volumes))
    names = list(dataset.class_names)
    tasks: list[dict] = []
    fb = torch.zeros(2, 2, dtype=torch.int64)                       # [intersection, union] x [background, organ]
    start, n_slices = time.perf_counter(), 0
    progress = tqdm(total=len(folds) * len(names), desc=desc, leave=False, mininterval=2, dynamic_ncols=True)
    for f, fold in enumerate(folds):
        s_index = support_volume(fold, len(volumes), support_rule)
        for c in range(len(names)):
            progress.update(1)
            if (f * len(names) + c) % dist.world != dist.rank:            # another process's task
                continue
            organ = _OrganTask(dataset, f, [volumes[i] for i in fold], volumes[s_index], c, support_rule)
            tasks.extend(organ.tasks)
            n_slices += organ.predict(model, runtime, nshot, bsz, fb)
    progress.close()
    if dist.enabled:
        tasks = [t for part in dist.all_gather_object(tasks) for t in part]
        tasks.sort(key=lambda t: (t['fold'], t['class_id'], volumes.index(t['query'])))
        fb = dist.all_reduce(fb)
        n_slices = int(dist.all_reduce(torch.tensor(n_slices)))
    scores = summarise(tasks, names, len(folds), miou_over)
    pooled = fb[0].double() / fb[1].double().clamp(min=1)
    scores['fbiou'] = float(pooled.mean() * 100)
    scores['seconds_per_slice'] = (time.perf_counter() - start) / max(n_slices, 1)
    return scores, tasks


class _OrganTask:
    r"""One (fold, organ) of the protocol: a task per query volume of the fold; `predict` scores them all."""

    def __init__(self, dataset, fold: int, fold_volumes: list[str], support: str, class_id: int, support_rule: str):
        self.dataset, self.support, self.class_id = dataset, support, class_id
        organ = dataset.class_names[class_id]
        self.s_slices = dataset.organ_slices(support, class_id)
        self.tasks = []
        for query in (v for v in fold_volumes if v != support):
            q_slices = dataset.organ_slices(query, class_id)
            task = {'fold': fold, 'fold_volumes': fold_volumes, 'organ': organ, 'class_id': class_id,
                    'support_rule': support_rule, 'support': support, 'query': query, 'query_slices': q_slices}
            if not self.s_slices or not q_slices:
                task['skipped'] = (f'the support volume {support} has no {organ}' if not self.s_slices
                                   else f'the query volume {query} has no {organ}')
            self.tasks.append(task)

    def predict(self, model, runtime: Runtime, nshot: int, bsz: int, fb: torch.Tensor) -> int:
        r"""Score every task (TP/FP/FN, Dice, IoU; `fb` accumulates the FB-IoU sums); returns the slices run."""
        if not self.s_slices:
            return 0
        device, c = runtime.device, self.class_id
        chunks = [[self.s_slices[i] for i in idx] for idx in support_slice_indices(len(self.s_slices), nshot)]
        imgs, masks = _stack_supports(self.dataset, self.support, chunks, c)
        supports = model.encode_supports(imgs.to(device), masks.to(device),
                                         torch.full((len(chunks),), c, dtype=torch.long, device=device))
        work = []                                                    # (task, chunk j, query slice z)
        for task in (t for t in self.tasks if 'skipped' not in t):
            bounds = chunk_bounds(len(task['query_slices']))
            task.update(support_slices=chunks,
                        chunks=[task['query_slices'][bounds[j]:bounds[j + 1]] for j in range(N_PART)], tp=0, fp=0, fn=0)
            work.extend((task, j, z) for j in range(N_PART) for z in task['chunks'][j])
        for b in range(0, len(work), bsz):
            items = work[b:b + bsz]
            loaded = [self.dataset.load_slice(task['query'], z, c) for task, _, z in items]
            query_img = torch.stack([x[0] for x in loaded]).to(device, non_blocking=True)
            record = model.encode_query(query_img, supports.select([j for _, j, _ in items]))
            with autocast(device, runtime.precision):
                pred = model.segment(model.infer(record)).cpu()            # [n,S,S]
            for (task, _, _), (_, _, gt), p in zip(items, loaded, pred):
                _count(task, p, gt, fb)
        for task in (t for t in self.tasks if 'tp' in t):
            tp, fp, fn = task['tp'], task['fp'], task['fn']
            task['dice'] = 100.0 * 2 * tp / (2 * tp + fp + fn)               # > 0: the query slices hold the organ
            task['iou'] = 100.0 * tp / (tp + fp + fn)
        return len(work)


def _count(task: dict, p: torch.Tensor, gt, fb: torch.Tensor) -> None:
    r"""A slice's prediction back on the prepared grid of its volume ([S,S] -> [H,W]), counted into its task."""
    p = F.interpolate(p[None, None].float(), gt.shape, mode='nearest')[0, 0].bool()
    g = torch.from_numpy(gt).bool()
    tp, fp, fn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
    tn = g.numel() - tp - fp - fn
    task['tp'], task['fp'], task['fn'] = task['tp'] + tp, task['fp'] + fp, task['fn'] + fn
    fb += torch.tensor([[tn, tp], [tn + fp + fn, tp + fp + fn]])


def summarise(tasks: list[dict], class_names: list[str], n_folds: int, miou_over: str = 'all') -> dict:
    r"""Per organ: mean over folds of the mean over that fold's query volumes; overall: mean over organs, all of
    them (an organ never evaluated counts 0; 'all') or the evaluated ones ('seen')."""
    per_fold: dict[str, dict[str, float]] = {}
    dice, iou, counts = {}, {}, {}
    for organ in class_names:
        fold_dice, fold_iou, n = [], [], 0
        for f in range(n_folds):
            done = [t for t in tasks if t['organ'] == organ and t['fold'] == f and 'dice' in t]
            if not done:
                continue
            fold_dice.append(float(np.mean([t['dice'] for t in done])))
            fold_iou.append(float(np.mean([t['iou'] for t in done])))
            per_fold.setdefault(str(f), {})[organ] = fold_dice[-1]
            n += len(done)
        if fold_dice:
            dice[organ], iou[organ], counts[organ] = float(np.mean(fold_dice)), float(np.mean(fold_iou)), n
    if not dice:
        raise UserError('the volumetric protocol evaluated nothing: no organ appears in both a support and a query '
                        'volume')
    missing = [organ for organ in class_names if organ not in dice]
    n_mean = len(class_names) if miou_over == 'all' else len(dice)
    return {'miou': float(sum(iou.values()) / n_mean), 'dice': float(sum(dice.values()) / n_mean),
            'per_class': iou, 'per_class_dice': dice, 'episodes_per_class': counts, 'per_fold': per_fold,
            'metric': dict(metric_record(miou_over, len(class_names)),
                           definition='3D Dice (and IoU) per query volume, mean over volumes, folds, then organs'
                                      + (' (all organs; never evaluated: 0)' if miou_over == 'all' else
                                         ' (evaluated organs)')),
            'classes_without_episodes': missing}
