r"""predict.py: your own images of any size and mode, support pairing, every mask encoding, every error path."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from common.errors import UserError, run_cli
from data.checks import open_binary_mask
from data.episodic import image_tensor, mask_tensor
from engine.factory import load_model
from model.base import Joint, Output, Vote


def run(argv, capsys) -> tuple[int, str]:
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            run_cli(lambda: predict.main(argv))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def _image(rng, h, w) -> np.ndarray:
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _box(h, w) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 4:3 * h // 4, w // 3:2 * w // 3] = 255
    return m


@pytest.fixture(scope='module')
def own(tmp_path_factory):
    r"""A user's folder: two supports (0/255 and 0/1 masks, different sizes) and four odd queries."""
    root = tmp_path_factory.mktemp('own')
    rng = np.random.default_rng(0)
    Image.fromarray(_image(rng, 333, 517)).save(root / 's1.png')
    Image.fromarray(_box(333, 517)).save(root / 's1_mask.png')
    Image.fromarray(_image(rng, 120, 90)).save(root / 's2.jpg')
    Image.fromarray((_box(120, 90) > 0).astype(np.uint8)).save(root / 's2_mask.png')
    q = root / 'queries'
    q.mkdir()
    Image.fromarray(_image(rng, 333, 517)).save(q / 'rgb.png')
    Image.fromarray(_image(rng, 90, 300)[..., 0]).save(q / 'gray.png')                        # L
    Image.fromarray(np.dstack([_image(rng, 120, 80), np.full((120, 80), 100, np.uint8)])).save(q / 'rgba.png')
    Image.fromarray((rng.random((70, 64)) * 60000).astype(np.uint16)).save(q / 'deep.png')     # 16-bit gray
    assert Image.open(q / 'deep.png').mode.startswith('I;16') and Image.open(q / 'rgba.png').mode == 'RGBA'
    bad = root / 'bad'
    bad.mkdir()
    (bad / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
    Image.fromarray(_box(50, 60)).save(bad / 'small_mask.png')
    Image.fromarray(np.zeros((333, 517), np.uint8)).save(bad / 'empty_mask.png')
    (root / 'empty_dir').mkdir()
    (root / 'notes').mkdir()
    (root / 'notes' / 'mine.txt').write_text('a file of the user')
    return root


def supports(own: Path) -> list[str]:
    return ['--support', f'{own}/s1.png:{own}/s1_mask.png', '--support', f'{own}/s2.jpg:{own}/s2_mask.png']


@pytest.mark.slow
def test_masks_of_original_size_for_odd_images_and_the_same_logits_as_the_model(own, tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    seen = []
    real = predict.full_size_mask
    monkeypatch.setattr(predict, 'full_size_mask', lambda m, out, size: seen.append(out.logits) or real(m, out, size))
    out = tmp_path / 'preds'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        summary = predict.main(['--load', str(tiny_checkpoint), *supports(own), '--query', str(own / 'queries'),
                                '--out', str(out), '--bsz', '3', '--device', 'cpu'])
    sizes = {'rgb': (517, 333), 'gray': (300, 90), 'rgba': (80, 120), 'deep': (64, 70)}
    assert sorted(p.name for p in (out / 'masks').iterdir()) == sorted(f'{n}.png' for n in sizes)
    for name, size in sizes.items():
        mask = Image.open(out / 'masks' / f'{name}.png')
        assert mask.mode == 'L' and mask.size == size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        assert Image.open(out / 'overlays' / f'{name}.jpg').size == size
    saved = json.loads((out / 'summary.json').read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved['nshot'] == 2 and saved['img_size'] == 64 and len(saved['queries']) == 4 and saved['text'] is None
    assert [s['size'] for s in saved['supports']] == [[517, 333], [90, 120]]
    assert not list(tmp_path.glob('.preds*'))                                  # no temporary folder left

    # the logits predict.py resized are exactly the model's own on the same inputs (supports encoded once, the
    # queries batched 3 + 1): same preprocessing as the loaders, nothing lost in batching
    model, _ = load_model(str(tiny_checkpoint), torch.device('cpu'))
    from data.checks import open_rgb
    s_imgs = torch.stack([image_tensor(open_rgb(own / n), 64) for n in ('s1.png', 's2.jpg')])[None]
    s_masks = torch.stack([mask_tensor(open_binary_mask(own / n), 64) for n in ('s1_mask.png', 's2_mask.png')])[None]
    order = sorted((own / 'queries').iterdir())
    with torch.no_grad():
        for query, logits in zip(order, seen):
            q = image_tensor(open_rgb(query), 64)[None]
            expected = model.infer(model.encode(q, s_imgs, s_masks, torch.zeros(1, dtype=torch.long))).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_full_size_mask_resizes_the_logits_by_hand():
    r"""A step in the logits (fg in source columns 0-1 of 4) resized bilinearly (align_corners) to width 10: target
    column x sits at source x*3/9; the fg-bg margin is +1 up to source 1, falls linearly to -1 at source 2 and
    crosses 0 at 1.5, so columns 0..4 (x*3/9 < 1.5) are foreground."""
    class Stub:
        segment = staticmethod(lambda out: Joint.segment(out.logits))
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :, :2], logits[0, 0, :, 2:] = 1.0, 1.0
    mask = predict.full_size_mask(Stub, Output(logits), (6, 10))
    expected = np.zeros((6, 10), bool)
    expected[:, :5] = True
    assert np.array_equal(mask, expected)

    class VoteStub:                                           # 'vote' logits [B,K,2,h,w] go through the vote
        segment = staticmethod(lambda out: Vote.segment(out.logits))
    two = torch.stack([logits, logits.flip(-1)], dim=1)      # shot 2 votes for the right half
    assert predict.full_size_mask(VoteStub, Output(two), (6, 10)).all()   # each half gets 1 of max 1 votes


def test_huge_images_are_segmented_at_a_bounded_size_then_enlarged(monkeypatch):
    class Stub:
        segment = staticmethod(lambda out: Joint.segment(out.logits))
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :, :2], logits[0, 0, :, 2:] = 1.0, 1.0
    monkeypatch.setattr(predict, 'MAX_UPSAMPLED', 2 * 30 * 50)   # 2 channels x a 30x50 grid at most
    mask = predict.full_size_mask(Stub, Output(logits), (300, 500))
    assert mask.shape == (300, 500)
    assert mask[:, :240].all() and not mask[:, 260:].any()       # the step near the middle, as at full size


def test_mask_encodings(tmp_path):
    r"""0/255, 0/1, RGBA, 16-bit (0/65535 and 0/1), gray palettes (as optimisers write them) and colour palettes
    (indices: 0 and VOC's 255 border are background)."""
    fg = np.zeros((6, 8), bool)
    fg[1:4, 2:6] = True
    cases = {
        'gray255': Image.fromarray(fg.astype(np.uint8) * 255),
        'gray01': Image.fromarray(fg.astype(np.uint8)),
        'rgba': Image.fromarray(np.dstack([fg.astype(np.uint8) * 255] * 3 + [np.full(fg.shape, 255, np.uint8)])),
        'deep65535': Image.fromarray(fg.astype(np.uint16) * 65535),
        'deep01': Image.fromarray(fg.astype(np.uint16)),
    }
    gray = Image.fromarray(fg.astype(np.uint8) * 255).convert('P')          # a palette of grays
    cases['gray_palette'] = gray
    voc = fg.astype(np.uint8)                                                # index 1 = VOC's dark red
    voc[0, :] = 255                                                          # the void border
    pal = Image.fromarray(voc)
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    cases['voc_palette'] = pal
    for name, img in cases.items():
        img.save(tmp_path / f'{name}.png')
        assert np.array_equal(open_binary_mask(tmp_path / f'{name}.png'), fg.astype(np.uint8)), name
    (tmp_path / 'junk.png').write_bytes(b'junk')
    with pytest.raises(UserError, match='junk.png'):
        open_binary_mask(tmp_path / 'junk.png')


def test_support_pairing(tmp_path):
    rng = np.random.default_rng(1)

    def pair(folder: Path, image: str, mask: str | None):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, 20, 30)).save(folder / image)
        if mask:
            Image.fromarray(_box(20, 30)).save(folder / mask)
    # images/ + masks/: by stem, a mask's _mask / _segmentation suffix stripped (Chest X-ray, ISIC)
    split = tmp_path / 'split'
    pair(split / 'images', 'a.jpg', None)
    pair(split / 'images', 'b.png', None)
    pair(split / 'images', 'c.bmp', None)
    (split / 'masks').mkdir()
    for name in ('a.png', 'b_mask.png', 'c_segmentation.png'):
        Image.fromarray(_box(20, 30)).save(split / 'masks' / name)
    got = predict.pair_support_dir(split)
    assert [(i.name, m.name) for i, m in got] == [('a.jpg', 'a.png'), ('b.png', 'b_mask.png'),
                                                  ('c.bmp', 'c_segmentation.png')]
    # one flat folder: <stem>_mask.*, and FSS-1000's n.jpg + n.png
    flat = tmp_path / 'flat'
    pair(flat, 'x.png', 'x_mask.png')
    pair(flat, '1.jpg', '1.png')
    got = predict.pair_support_dir(flat)
    assert [(i.name, m.name) for i, m in got] == [('1.jpg', '1.png'), ('x.png', 'x_mask.png')]
    # an image without a mask is an error naming it and the expected mask
    pair(flat, 'lonely.png', None)
    with pytest.raises(UserError, match=r'lonely.png: no mask \(expected .*lonely_mask.png'):
        predict.pair_support_dir(flat)
    # IMAGE:MASK where the paths contain ':' themselves
    odd = tmp_path / 'a:b'
    pair(odd, 'i.png', 'm.png')
    assert predict.split_support(f'{odd}/i.png:{odd}/m.png') == (odd / 'i.png', odd / 'm.png')
    assert predict.output_names([Path('p/a.png'), Path('q/a.jpg'), Path('r/b.png')]) == ['a_png', 'a_jpg', 'b']


# (id, argv builder, text the message must name)
ERRORS = [
    ('no-support', lambda o, c: ['--load', c, '--query', str(o / 'queries'), '--out', str(o / 'x')], '--support'),
    ('support-without-colon', lambda o, c: ['--load', c, '--support', str(o / 's1.png'), '--query', str(o / 'queries'),
                                            '--out', str(o / 'x')], 'IMAGE:MASK'),
    ('support-missing-mask', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/nope.png', '--query',
                                           str(o / 'queries'), '--out', str(o / 'x')], 'nope.png'),
    ('support-unreadable', lambda o, c: ['--load', c, '--support', f'{o}/bad/broken.png:{o}/s1_mask.png', '--query',
                                         str(o / 'queries'), '--out', str(o / 'x')], 'broken.png'),
    ('size-mismatch', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/bad/small_mask.png', '--query',
                                    str(o / 'queries'), '--out', str(o / 'x')], 'small_mask.png is 60x50'),
    ('empty-mask', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/bad/empty_mask.png', '--query',
                                 str(o / 'queries'), '--out', str(o / 'x')], 'empty_mask.png has no foreground'),
    ('no-query', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--out', str(o / 'x')],
     '--query'),
    ('empty-query-folder', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--query',
                                         str(o / 'empty_dir'), '--out', str(o / 'x')], 'no query images'),
    ('query-missing', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--query',
                                    str(o / 'nothing.png'), '--out', str(o / 'x')], 'nothing.png'),
    ('query-unreadable', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--query',
                                       str(o / 'bad' / 'broken.png'), '--out', str(o / 'x')], 'broken.png'),
    ('out-not-empty', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--query',
                                    str(o / 'queries'), '--out', str(o / 'notes')], '--overwrite'),
    ('out-holds-the-inputs', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--query',
                                           str(o / 'queries'), '--out', str(o)], 'contains the input --support'),
    ('no-out', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--query', str(o / 'queries')],
     '--out'),
    ('bsz-zero', lambda o, c: ['--load', c, '--bsz', '0'], '--bsz must be an integer >= 1'),
    ('load-folder', lambda o, c: ['--load', str(Path(c).parent)], 'is a run folder'),
    ('text-on-plain-checkpoint', lambda o, c: ['--load', c, '--support', f'{o}/s1.png:{o}/s1_mask.png', '--query',
                                               str(o / 'queries' / 'rgb.png'), '--out', str(o / 'x'), '--class-name',
                                               'lung', '--benchmark', 'lung'], 'has no CD-TG plug-in'),
]


@pytest.mark.parametrize('case', ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_inputs(case, own, tiny_checkpoint, capsys):
    _, argv, expected = case
    code, out = run(argv(own, str(tiny_checkpoint)), capsys)
    assert code == 2 and 'Traceback' not in out
    assert expected in out, out
    assert not (own / 'x').exists() and not list(own.glob('.x.tmp*'))       # nothing half-written


@pytest.mark.slow
def test_a_failure_mid_run_leaves_nothing(own, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    calls = []

    def failing(model, output, size):
        calls.append(1)
        if len(calls) == 2:
            raise UserError('simulated failure on the second query')
        return np.zeros(size, bool)
    monkeypatch.setattr(predict, 'full_size_mask', failing)
    code, out = run(['--load', str(tiny_checkpoint), *supports(own), '--query', str(own / 'queries'), '--out',
                     str(tmp_path / 'preds'), '--device', 'cpu'], capsys)
    assert code == 2 and 'simulated failure' in out
    assert list(tmp_path.iterdir()) == []                                    # neither preds/ nor a temp folder


def test_class_names_are_looked_up_in_the_description_files():
    assert predict.find_class('Cyan_Diamond', None) == ('synthetic', 'cyan diamond')        # any spelling
    assert predict.find_class('lung', 'lung') == ('lung', 'lung')
    with pytest.raises(UserError, match='several files.*--benchmark'):                  # lung.yaml, synthetic-med
        predict.find_class('lung', None)
    with pytest.raises(UserError, match="'no such thing'.*--description"):
        predict.find_class('no such thing', None)


@pytest.mark.slow
def test_cdtg_needs_text_and_takes_a_one_off_description(own, tiny_cdtg_checkpoint, tmp_path, capsys, monkeypatch):
    base = ['--load', str(tiny_cdtg_checkpoint), '--support', f'{own}/s1.png:{own}/s1_mask.png', '--query',
            str(own / 'queries' / 'gray.png'), '--device', 'cpu']
    code, out = run(base + ['--out', str(tmp_path / 'a')], capsys)
    assert code == 2 and 'needs the class\'s text' in out and not (tmp_path / 'a').exists()
    code, out = run(base + ['--out', str(tmp_path / 'a'), '--class-name', 'lung'], capsys)   # before any model
    assert code == 2 and 'several files' in out and '--benchmark' in out

    from text.plugin import CDTG
    bound = []
    real = CDTG.bind_texts
    monkeypatch.setattr(CDTG, 'bind_texts', lambda self, *a: bound.append(a) or real(self, *a))
    text = 'A photo of a polyp, a small rounded pink bulge on the bowel wall.'
    code, out = run(base + ['--out', str(tmp_path / 'a'), '--description', text, '--class-name', 'polyp'], capsys)
    assert code == 0, out
    assert bound == [('predict', ['polyp'], [[text]], [predict.GENERIC_BACKGROUND])]
    summary = json.loads((tmp_path / 'a' / 'summary.json').read_text())
    assert summary['text'] == {'class_name': 'polyp', 'source': '--description', 'texts': [text],
                               'background': [predict.GENERIC_BACKGROUND]}
    assert summary['plugin']['name'] == 'cdtg'
    assert Image.open(tmp_path / 'a' / 'masks' / 'gray.png').size == (300, 90)
