r"""Text Generation Unit: shipped description files, the lookup API, validation errors, and the generator script
end to end against a fake OpenAI-compatible server on 127.0.0.1."""
import ast
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from data.coco import CLASSES as COCO_CLASSES
from data.pascal import CLASSES as PASCAL_CLASSES
from data.synthetic import MEDICAL_CLASSES, NATURAL_CLASSES
from text.descriptions import (DESCRIPTIONS_DIR, available_benchmarks, load_description_file, load_descriptions,
                               load_template, normalize_name, text_hash, texts_hash)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'generate_descriptions.py'
EXPECTED = {
    'pascal': list(PASCAL_CLASSES),
    'coco': list(COCO_CLASSES),
    'synthetic': [c[0] for c in NATURAL_CLASSES],
    'synthetic-med': list(MEDICAL_CLASSES),
    'isic': ['melanoma', 'nevus', 'seborrheic keratosis', 'lesion'],
    'lung': ['lung'],
    'wbc': ['nucleus', 'cytoplasm'],
    'kvasir': ['polyp'],
    'chaos': ['liver', 'right kidney', 'left kidney', 'spleen'],
    'abd-ct': ['spleen', 'right kidney', 'left kidney', 'liver'],                  # SSL-ALPNet's label order
    'cmr': ['left ventricular myocardium', 'left ventricular blood pool', 'right ventricle'],   # Q-Net 1-3
    'deepglobe': ['agriculture land', 'urban land', 'rangeland', 'forest land', 'water', 'barren land'],   # PATNet 1-6
    'fss': [],
}
KEYS = ['what', 'shape', 'size', 'colour', 'texture', 'boundary', 'context']


def _load_script():
    spec = importlib.util.spec_from_file_location('generate_descriptions', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_script()


# --- shipped files ----------------------------------------------------------------------------------------------
def test_every_benchmark_has_exactly_one_file():
    assert available_benchmarks() == sorted(EXPECTED)


@pytest.mark.parametrize('benchmark', sorted(EXPECTED))
def test_shipped_file_covers_its_classes(benchmark):
    desc = load_descriptions(benchmark)
    template = load_template()
    assert desc.benchmark == benchmark and desc.class_names == EXPECTED[benchmark]
    assert desc.provenance['template_version'] == str(template.version)
    assert desc.modality
    entries = [*desc.classes, desc.background]
    for entry in entries:
        assert entry.caption.startswith('A photo of'), entry.caption
        assert 15 <= len(entry.caption.split()) <= 35, entry.caption
        assert list(entry.attribute_keys) == template.keys == KEYS
        assert all(a.strip() and a == a.strip() for a in entry.attributes)
        assert len(set(entry.attributes)) == len(entry.attributes), f'repeated attribute in {entry.name}'
    assert len({e.caption for e in entries}) == len(entries), 'two classes share a caption'
    with warnings.catch_warnings():
        warnings.simplefilter('error')      # a described class must never take the fallback path
        texts = desc.for_classes(EXPECTED[benchmark])
    assert [t.name for t in texts] == EXPECTED[benchmark] and not any(t.generic for t in texts)
    assert desc.fallback == ('generic' if benchmark == 'fss' else None)


@pytest.mark.parametrize('benchmark,module,attrs', [
    ('isic', 'data.isic', ('CLASSES', 'SINGLE_CLASS')), ('lung', 'data.lung', ('CLASSES',)),
    ('wbc', 'data.wbc', ('CLASSES',)), ('chaos', 'data.chaos', ('ORGANS',)),
    ('abd-ct', 'data.abdct', ('ORGANS',)), ('cmr', 'data.cmr', ('CLASSES',)),
    ('kvasir', 'data.kvasir', ('CLASSES',)),
    ('deepglobe', 'data.deepglobe', ('CLASSES',)),
])
def test_target_loader_class_names_resolve(benchmark, module, attrs):
    # the loaders of the target benchmarks name their classes themselves; every name must find its description
    loader = pytest.importorskip(module)
    names = []
    for attr in attrs:
        value = getattr(loader, attr)
        names += [value] if isinstance(value, str) else list(value)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        texts = load_descriptions(benchmark).for_classes(names)
    assert sorted(t.name for t in texts) == sorted(EXPECTED[benchmark])


def test_class_names_are_mentioned_in_their_captions():
    # a caption that forgot its class (copy-paste slip) would guide the wrong class; check the head word appears
    for benchmark in EXPECTED:
        desc = load_descriptions(benchmark)
        for entry in desc.classes:
            spellings = [entry.name, *entry.aliases]
            caption = normalize_name(entry.caption)
            assert any(normalize_name(s) in caption for s in spellings), (benchmark, entry.name, entry.caption)


# --- lookup -----------------------------------------------------------------------------------------------------
def test_lookup_accepts_loader_spellings_and_aliases():
    isic = load_descriptions('isic')
    sk = isic.get('seborrheic keratosis')
    for spelling in ('seborrheic_keratosis', 'Seborrheic Keratosis', '  seborrheic   keratosis ', 'SK',
                     'seborrhoeic keratosis'):
        assert isic.get(spelling) is sk
    assert isic.caption('Melanoma') == isic.classes[0].caption
    assert load_descriptions('wbc').get('Nucleus').name == 'nucleus'
    assert load_descriptions('deepglobe').get('forest').name == 'forest land'
    assert load_descriptions('deepglobe').get('Forest_Land').name == 'forest land'
    assert load_descriptions('pascal').get('dining table').name == 'diningtable'
    assert load_descriptions('chaos').get('RK').name == 'right kidney'
    assert load_descriptions('abd-ct').get('KID_l').name == 'left kidney'          # SSL-ALPNet's label name
    assert load_descriptions('cmr').get('LV-MYO').name == 'left ventricular myocardium'   # Q-Net's
    assert load_descriptions('cmr').get('RV').name == 'right ventricle'
    # dataset order is kept, whatever the file order
    wbc = load_descriptions('wbc')
    assert [t.name for t in wbc.for_classes(['Cytoplasm', 'Nucleus'])] == ['cytoplasm', 'nucleus']
    assert 'NUCLEUS' in wbc and 'platelet' not in wbc


def test_texts_and_background():
    lung = load_descriptions('lung')
    entry = lung.get('lung')
    assert lung.texts('lung') == [entry.caption, *entry.attributes] and len(lung.attributes('lung')) == 7
    assert lung.background_caption.startswith('A photo of the background')
    assert len(lung.background_attributes) == 7 and lung.background_caption not in lung.background_attributes


def test_content_hash_is_sha256_of_the_exact_texts(tmp_path):
    assert text_hash('abc') == 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'   # FIPS 180-2
    assert texts_hash(['ab', 'c']) != texts_hash(['a', 'bc'])
    isic = load_descriptions('isic')
    hashes = [isic.content_hash(n) for n in EXPECTED['isic']]
    assert len(set(hashes)) == len(hashes)
    assert hashes == [load_descriptions('isic').content_hash(n) for n in EXPECTED['isic']]   # stable across loads
    assert isic.content_hash('nevus') == texts_hash(isic.texts('nevus'))

    data = yaml.safe_load((DESCRIPTIONS_DIR / 'isic.yaml').read_text())
    data['classes'][1]['attributes']['texture'] += ' More.'
    (tmp_path / 'isic.yaml').write_text(yaml.safe_dump(data, sort_keys=False))
    changed = load_descriptions('isic', root=tmp_path)
    assert changed.content_hash('nevus') != hashes[1]
    assert [changed.content_hash(n) for n in ('melanoma', 'seborrheic keratosis', 'lesion')] == \
        [hashes[0], hashes[2], hashes[3]]
    data['classes'][1]['attributes']['texture'] = isic.get('nevus').attributes[4]
    data['classes'][1]['caption'] = data['classes'][1]['caption'].replace('round', 'rounded')
    (tmp_path / 'isic.yaml').write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_descriptions('isic', root=tmp_path).content_hash('nevus') not in (hashes[1],
                                                                                 changed.content_hash('nevus'))


def test_unknown_class_is_a_clear_error():
    isic = load_descriptions('isic')
    with pytest.raises(UserError, match=r"isic\.yaml.*'melanomaa'") as err:
        isic.get('melanomaa')
    assert "did you mean 'melanoma'" in str(err.value)
    with pytest.raises(UserError, match="'zebra'"):
        isic.for_classes(['nevus', 'zebra'])


def test_fss_falls_back_to_the_generic_caption_with_a_warning():
    fss = load_descriptions('fss')
    with pytest.warns(UserWarning, match=r'fss\.yaml: 3 of 3 classes .*generic caption'):
        texts = fss.for_classes(['ab_wheel', 'abacus', 'african_crocodile'])
    assert [t.caption for t in texts] == ['A photo of an ab wheel.', 'A photo of an abacus.',
                                          'A photo of an african crocodile.']
    assert all(t.generic and t.attributes == (t.caption,) for t in texts)
    assert fss.background_caption.startswith('A photo of the background')


def test_partial_fallback_counts_only_the_missing_classes(tmp_path):
    data = yaml.safe_load((DESCRIPTIONS_DIR / 'wbc.yaml').read_text())
    data['fallback'] = 'generic'
    (tmp_path / 'wbc.yaml').write_text(yaml.safe_dump(data, sort_keys=False))
    wbc = load_descriptions('wbc', root=tmp_path)
    with pytest.warns(UserWarning, match=r"1 of 3 classes .*'platelet'"):
        texts = wbc.for_classes(['nucleus', 'platelet', 'cytoplasm'])
    assert [t.generic for t in texts] == [False, True, False] and texts[1].caption == 'A photo of a platelet.'


# --- validation -------------------------------------------------------------------------------------------------
def _mutate_isic(fn):
    data = yaml.safe_load((DESCRIPTIONS_DIR / 'isic.yaml').read_text())
    fn(data)
    return data


BAD_FILES = {
    'no caption': (lambda d: d['classes'][0].pop('caption'), "classes[0] (melanoma): missing caption"),
    'empty attribute': (lambda d: d['classes'][1]['attributes'].update(shape='  '), 'attributes.shape is empty'),
    'two attributes': (lambda d: d['classes'][2].update(attributes={'what': 'A thing.', 'shape': 'Round.'}),
                       'at least 3 are required'),
    'attribute list': (lambda d: d['classes'][2].update(attributes=['A.', 'B.', 'C.']), 'must map each template'),
    'attribute key': (lambda d: d['classes'][2]['attributes'].update({'Bad Key': 'A sentence.'}),
                      "'Bad Key' must be lower-case identifiers"),
    'typo key': (lambda d: d.update(clases=d.pop('classes')), 'unknown key'),
    'alias clash': (lambda d: d['classes'][1]['aliases'].append('Melanoma'), 'same (after normalisation)'),
    'wrong format': (lambda d: d.update(format='cdtg-descriptions/0'), '`format` must be'),
    'no classes': (lambda d: d.update(classes=[]), 'describe the classes or declare `fallback: generic`'),
    'no date': (lambda d: d['provenance'].pop('date'), 'provenance lacks date'),
    'too long': (lambda d: d['classes'][0].update(caption='A photo of ' + 'very ' * 70 + 'long.'), 'words'),
    'two lines': (lambda d: d['background'].update(caption='A photo\nof two lines.'), 'single line'),
    'no background': (lambda d: d.pop('background'), 'missing `background`'),
    'bad fallback': (lambda d: d.update(fallback='silent'), '`fallback` must be'),
}


@pytest.mark.parametrize('case', sorted(BAD_FILES))
def test_malformed_file_names_the_file_and_the_problem(tmp_path, case):
    mutate, expected = BAD_FILES[case]
    path = tmp_path / 'isic.yaml'
    path.write_text(yaml.safe_dump(_mutate_isic(mutate), sort_keys=False))
    with pytest.raises(UserError) as err:
        load_descriptions('isic', root=tmp_path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_unreadable_missing_and_misnamed_files(tmp_path):
    (tmp_path / 'isic.yaml').write_text('classes: [unclosed\n')
    with pytest.raises(UserError, match=r'isic\.yaml is not valid YAML'):
        load_descriptions('isic', root=tmp_path)
    with pytest.raises(UserError, match=r"no description file for benchmark 'nope'.*generate_descriptions"):
        load_descriptions('nope', root=tmp_path)
    shutil.copy(DESCRIPTIONS_DIR / 'isic.yaml', tmp_path / 'wbc.yaml')
    with pytest.raises(UserError, match="declares benchmark 'isic'"):
        load_descriptions('wbc', root=tmp_path)


def test_template_renders_every_question_and_rejects_bad_placeholders(tmp_path):
    template = load_template()
    system, user = template.messages('right kidney', 'chaos', 'abdominal MRI')
    assert system['role'] == 'system' and user['role'] == 'user'
    assert '"right kidney"' in user['content'] and 'abdominal MRI' in user['content']
    assert all(f'({k})' in user['content'] for k in KEYS) and template.json_format() in user['content']
    assert json.loads(template.json_format().replace('<one sentence>', 'x'))['attributes'].keys() == set(KEYS)
    assert 'background' in template.messages('background', 'chaos', 'MRI', background=True)[1]['content']
    bad = (ROOT / 'text' / 'template.yaml').read_text().replace('Class: "$class_name"', 'Class: "$clas_name"', 1)
    (tmp_path / 't.yaml').write_text(bad)
    with pytest.raises(UserError, match=r"t\.yaml: bad placeholder 'clas_name'"):
        load_template(tmp_path / 't.yaml')


def test_descriptions_module_makes_no_network_calls():
    tree = ast.parse((ROOT / 'text' / 'descriptions.py').read_text())
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {'urllib', 'http', 'socket', 'requests', 'ssl'}


# --- the generator against a fake OpenAI-compatible server ------------------------------------------------------
class FakeOpenAI:
    r"""chat/completions on 127.0.0.1; `modes[class]` is a list of behaviours consumed per request (last repeats)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.modes: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                name = re.search(r'Class: "([^"]*)"', body['messages'][1]['content']).group(1)
                with owner.lock:
                    owner.requests.append({'path': self.path, 'auth': self.headers.get('Authorization'),
                                           'class': name, **body})
                    queue = owner.modes.get(name, ['ok'])
                    mode = queue.pop(0) if len(queue) > 1 else queue[0]
                try:
                    owner.respond(self, name, mode)
                except (BrokenPipeError, ConnectionResetError):     # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}/v1'
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)

    def respond(self, handler, name: str, mode: str) -> None:
        if mode.startswith('http'):
            code = int(mode[4:])
            payload = json.dumps({'error': {'message': f'boom {code}'}}).encode()
            handler.send_response(code)
            handler.send_header('Content-Type', 'application/json')
            handler.send_header('Content-Length', str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        if mode == 'slow':
            time.sleep(1.0)
        answer = {'caption': f'A photo of {name}, a test class, drawn plainly with clear and smooth edges.',
                  'attributes': {k: f'The {name} answers the {k} question.' for k in KEYS}}
        if mode == 'missing':
            del answer['attributes']['texture']
        content = json.dumps(answer)
        if mode == 'fenced':
            content = f'Here you go:\n```json\n{json.dumps(answer, indent=2)}\n```'
        if mode == 'malformed':
            content = f'Sure! The {name} is dark purple and round.'
        payload = json.dumps({'id': 'cmpl-1', 'object': 'chat.completion', 'model': 'fake-gpt-4-0613',
                              'choices': [{'index': 0, 'finish_reason': 'stop',
                                           'message': {'role': 'assistant', 'content': content}}]}).encode()
        handler.send_response(200)
        handler.send_header('Content-Type', 'application/json')
        handler.send_header('Content-Length', str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)


@pytest.fixture
def fake_server(monkeypatch):
    for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    server = FakeOpenAI()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _run(server, tmp_path, *extra):
    return gen.main(['--base-url', server.url, '--api-key', 'test-key', '--model', 'fake-gpt', '--retries', '0',
                     '--out', str(tmp_path / 'out.yaml'), *extra])


def test_generator_cli_end_to_end(fake_server, tmp_path):
    out = tmp_path / 'wbc.yaml'
    env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower() and k != 'OPENAI_API_KEY'}
    env.update(no_proxy='127.0.0.1,localhost', OPENAI_API_KEY='test-key', OPENAI_BASE_URL=fake_server.url)
    proc = subprocess.run([sys.executable, str(SCRIPT), '--benchmark', 'wbc', '--out', str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    desc = load_descriptions('wbc', root=tmp_path)      # classes and aliases come from the shipped wbc.yaml
    assert desc.class_names == ['nucleus', 'cytoplasm'] and desc.get('cell nucleus').name == 'nucleus'
    assert desc.caption('nucleus') == 'A photo of nucleus, a test class, drawn plainly with clear and smooth edges.'
    assert desc.attributes('cytoplasm')[3] == 'The cytoplasm answers the colour question.'
    assert desc.background_caption.startswith('A photo of background')
    assert desc.modality == load_descriptions('wbc').modality
    assert desc.provenance['model'] == 'gpt-4 (served as fake-gpt-4-0613)'
    assert desc.provenance['endpoint'] == fake_server.url and desc.provenance['template'] == 'text/template.yaml'
    assert [r['class'] for r in fake_server.requests] == ['background', 'nucleus', 'cytoplasm']
    for r in fake_server.requests:
        assert r['path'] == '/v1/chat/completions' and r['auth'] == 'Bearer test-key'
        assert r['model'] == 'gpt-4' and r['temperature'] == 0.2 and [m['role'] for m in r['messages']] == \
            ['system', 'user']
    assert 'test-key' not in out.read_text()
    again = subprocess.run([sys.executable, str(SCRIPT), '--benchmark', 'wbc', '--out', str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.startswith('error: ') and 'pass --force' in again.stderr
    assert len(fake_server.requests) == 3        # refused before sending anything


def test_generator_malformed_answer_is_a_clear_error(fake_server, tmp_path):
    fake_server.modes['cytoplasm'] = ['malformed']
    with pytest.raises(UserError) as err:
        _run(fake_server, tmp_path, '--benchmark', 'wbc')
    msg = str(err.value)
    assert "class 'cytoplasm'" in msg and 'malformed: no JSON object' in msg and fake_server.url in msg
    assert not (tmp_path / 'out.yaml').exists()


def test_generator_missing_attribute_is_named(fake_server, tmp_path):
    fake_server.modes['nucleus'] = ['missing']
    with pytest.raises(UserError, match=r"class 'nucleus'.*lacks the key\(s\) texture"):
        _run(fake_server, tmp_path, '--benchmark', 'wbc')


def test_generator_asks_again_after_a_malformed_answer(fake_server, tmp_path):
    fake_server.modes['nucleus'] = ['malformed', 'fenced']
    desc = _run(fake_server, tmp_path, '--benchmark', 'wbc', '--retries', '1')
    assert [r['class'] for r in fake_server.requests].count('nucleus') == 2
    assert desc.attributes('nucleus')[0] == 'The nucleus answers the what question.'
    assert load_description_file(tmp_path / 'out.yaml').class_names == ['nucleus', 'cytoplasm']


@pytest.mark.parametrize('code,hint', [(500, 'boom 500'), (401, 'Check --api-key'), (400, 'boom 400')])
def test_generator_http_errors_name_the_endpoint_and_class(fake_server, tmp_path, code, hint):
    fake_server.modes['nucleus'] = [f'http{code}']
    with pytest.raises(UserError) as err:
        _run(fake_server, tmp_path, '--benchmark', 'wbc')
    msg = str(err.value)
    assert f'answered HTTP {code}' in msg and "class 'nucleus'" in msg and hint in msg and fake_server.url in msg
    assert not (tmp_path / 'out.yaml').exists()


def test_generator_timeout_and_unreachable_server(fake_server, tmp_path):
    fake_server.modes['background'] = ['slow']
    with pytest.raises(UserError, match=r'did not answer within 0\.2 s for the background'):
        _run(fake_server, tmp_path, '--benchmark', 'wbc', '--timeout', '0.2')
    with socket.socket() as s:       # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf'cannot reach http://127\.0\.0\.1:{port}/v1/chat/completions'):
        gen.main(['--benchmark', 'wbc', '--base-url', f'http://127.0.0.1:{port}/v1', '--api-key', 'k',
                  '--out', str(tmp_path / 'x.yaml'), '--retries', '0'])


def test_generator_explicit_classes_and_modality(fake_server, tmp_path):
    desc = gen.main(['--benchmark', 'heart', '--classes', 'left atrium, myocardium', '--modality', 'cardiac MRI',
                     '--base-url', fake_server.url, '--api-key', 'k', '--out', str(tmp_path / 'heart.yaml')])
    assert load_descriptions('heart', root=tmp_path).class_names == ['left atrium', 'myocardium'] == desc.class_names
    assert all('cardiac MRI' in r['messages'][1]['content'] for r in fake_server.requests)


def test_generator_keeps_the_fss_fallback(fake_server, tmp_path):
    desc = _run(fake_server, tmp_path, '--benchmark', 'fss')
    assert [r['class'] for r in fake_server.requests] == ['background'] and desc.fallback == 'generic'
    with pytest.warns(UserWarning, match='1 of 1 classes'):
        assert load_description_file(tmp_path / 'out.yaml').get('abacus').generic


def test_generator_refuses_to_overwrite_and_needs_a_modality(fake_server, tmp_path):
    (tmp_path / 'out.yaml').write_text('keep me')
    with pytest.raises(UserError, match='exists; pass --force'):
        _run(fake_server, tmp_path, '--benchmark', 'wbc')
    assert (tmp_path / 'out.yaml').read_text() == 'keep me' and not fake_server.requests
    with pytest.raises(UserError, match='pass --modality'):
        _run(fake_server, tmp_path, '--benchmark', 'heart', '--classes', 'x')


def test_generator_takes_classes_from_the_registry_without_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen, 'DESCRIPTIONS_DIR', tmp_path)
    gen.main(['--benchmark', 'synthetic-med', '--modality', 'grayscale test images', '--dry-run'])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [re.search(r'Class: "([^"]*)"', r['messages'][1]['content']).group(1) for r in lines]
    assert names == ['background', *MEDICAL_CLASSES] and lines[0]['model'] == 'gpt-4'
