r"""Metrics against hand-computed cases and an independent re-derivation of HSNet's Evaluator/AverageMeter."""
import pytest
import torch

from common.metrics import SegmentationMeter, format_scores, intersection_union


def t(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_intersection_union_by_hand():
    pred = t([[[1, 1, 0],
               [0, 1, 0]]])
    gt = t([[[1, 0, 0],
             [255, 1, 1]]])
    inter, union = intersection_union(pred, gt)
    # valid pixels: all but (1,0). fg: pred {(0,0),(0,1),(1,1)}, gt {(0,0),(1,1),(1,2)} -> I=2, U=4
    # bg: pred {(0,2),(1,2)}, gt {(0,1),(0,2)} -> I=1, U=3
    assert inter.tolist() == [[1, 2]]
    assert union.tolist() == [[3, 4]]


def test_ignored_pixels_do_not_count_even_when_predicted():
    pred = torch.ones(1, 2, 2, dtype=torch.int64)
    gt = t([[[255, 255], [255, 1]]])
    inter, union = intersection_union(pred, gt)
    assert inter.tolist() == [[0, 1]] and union.tolist() == [[0, 1]]


def test_empty_masks():
    zeros = torch.zeros(1, 3, 3, dtype=torch.int64)
    inter, union = intersection_union(zeros, zeros)
    assert inter.tolist() == [[9, 0]] and union.tolist() == [[9, 0]]
    meter = SegmentationMeter(['a'])
    meter.update(zeros, zeros, torch.tensor([0]))
    scores = meter.compute()
    # HSNet convention: IoU = I / max(U, 1) -> 0 for a class whose foreground never appears; FB-IoU pools bg too.
    assert scores['miou'] == 0.0
    assert scores['fbiou'] == pytest.approx(50.0)
    assert scores['dice'] == 0.0


def test_class_wise_accumulation_by_hand():
    # class IoU is sum(I) / sum(U) over the class's episodes, not the mean of episode IoUs
    meter = SegmentationMeter(['a', 'b', 'unused'])
    pred = t([[[1, 1, 1, 1]], [[1, 0, 0, 0]], [[0, 0, 1, 1]]])
    gt = t([[[1, 1, 0, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 1]]])
    meter.update(pred, gt, torch.tensor([0, 0, 1]), loss=torch.tensor(0.5))
    s = meter.compute()
    # class a: episodes (I=2, U=4) and (I=1, U=1) -> 3/5 = 60 % (the episode mean would be 75 %)
    assert s['per_class']['a'] == pytest.approx(100 * 3 / 5)
    assert s['per_class']['b'] == pytest.approx(100 * 1 / 2)
    assert 'unused' not in s['per_class']
    # the reference's convention: every class of the split, a class without episodes counts 0
    assert s['classes_without_episodes'] == ['unused'] and s['metric']['miou_over'] == 'all'
    assert s['miou'] == pytest.approx(100 * (3 / 5 + 1 / 2 + 0) / 3)
    assert s['per_class_dice']['a'] == pytest.approx(100 * 6 / 8)       # 2I / (I + U) = |P∩G| * 2 / (|P| + |G|)
    assert s['dice'] == pytest.approx(100 * (6 / 8 + 2 / 3 + 0) / 3)
    # bg: (I=0, U=2), (3, 3), (2, 3) -> 5/8 ; fg: (2, 4), (1, 1), (1, 2) -> 4/7
    assert s['fbiou'] == pytest.approx(100 * (5 / 8 + 4 / 7) / 2)
    assert s['loss'] == pytest.approx(0.5)
    assert s['episodes_per_class'] == {'a': 2, 'b': 1}
    # over the classes seen: only a and b are averaged; FB-IoU is the same under both conventions
    seen = SegmentationMeter(['a', 'b', 'unused'], over='seen')
    seen.update(pred, gt, torch.tensor([0, 0, 1]))
    s2 = seen.compute()
    assert s2['miou'] == pytest.approx(100 * (3 / 5 + 1 / 2) / 2)
    assert s2['dice'] == pytest.approx(100 * (6 / 8 + 2 / 3) / 2)
    assert s2['fbiou'] == s['fbiou'] and s2['metric']['miou_over'] == 'seen'
    assert s2['classes_without_episodes'] == ['unused']
    with pytest.raises(ValueError):
        SegmentationMeter(['a'], over='some')


def _hsnet_reference(preds, gts, class_ids, nclass):
    r"""Float64 re-derivation of HSNet's Evaluator.classify_prediction + AverageMeter.compute_iou: IoU over
    `class_ids_interest`, every class of the split (common/logger.py of juhongm999/hsnet)."""
    inter_buf = torch.zeros(2, nclass, dtype=torch.float64)
    union_buf = torch.zeros(2, nclass, dtype=torch.float64)
    for pred, gt, c in zip(preds, gts, class_ids):
        pred = pred.clone().double()
        gt = gt.double()
        pred[gt == 255] = 255
        inter = pred[pred == gt]
        area_inter = torch.histc(inter, bins=2, min=0, max=1) if inter.numel() else torch.zeros(2, dtype=torch.float64)
        area_pred = torch.histc(pred, bins=2, min=0, max=1)
        area_gt = torch.histc(gt, bins=2, min=0, max=1)
        inter_buf[:, c] += area_inter
        union_buf[:, c] += area_pred + area_gt - area_inter
    interest = list(range(nclass))
    iou = inter_buf / torch.clamp(union_buf, min=1)
    miou = iou[1, interest].mean() * 100
    fbiou = (inter_buf[:, interest].sum(1) / union_buf[:, interest].sum(1)).mean() * 100
    return float(miou), float(fbiou)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_hsnet_evaluator_on_random_episodes(seed):
    g = torch.Generator().manual_seed(seed)
    n, nclass = 40, 5 + seed % 2                              # seed 1: class 5 never gets an episode
    preds = (torch.rand(n, 17, 13, generator=g) > 0.6).long()
    gts = (torch.rand(n, 17, 13, generator=g) > 0.7).long()
    gts[torch.rand(n, 17, 13, generator=g) > 0.9] = 255
    class_ids = torch.randint(0, 5, (n,), generator=g)
    meter = SegmentationMeter([f'c{i}' for i in range(nclass)])
    for i in range(0, n, 7):                                  # several batches
        meter.update(preds[i:i + 7], gts[i:i + 7], class_ids[i:i + 7])
    s = meter.compute()
    miou, fbiou = _hsnet_reference(preds, gts, class_ids, nclass)
    assert s['miou'] == pytest.approx(miou, abs=1e-9)
    assert s['fbiou'] == pytest.approx(fbiou, abs=1e-9)


@pytest.mark.slow
def test_counts_are_exact_int64_beyond_float32_range():
    meter = SegmentationMeter(['a'])
    big = torch.ones(1, 4100, 4100, dtype=torch.int64)       # 16.8 M pixels > 2^24
    for _ in range(3):
        meter.update(big, big, torch.tensor([0]))
    assert meter.inter.dtype == torch.int64
    assert int(meter.inter[0, 1]) == 3 * 4100 * 4100


def test_shape_mismatch_and_empty_meter_are_errors():
    with pytest.raises(ValueError):
        intersection_union(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError):
        SegmentationMeter(['a']).compute()


def test_format_line():
    assert format_scores({'miou': 12.345, 'fbiou': 50, 'dice': 7.0}) == 'mIoU: 12.35  FB-IoU: 50.00  Dice: 7.00'
