r"""Class descriptions of the Text Generation Unit: the question template and text/descriptions/<benchmark>.yaml.

A description file (YAML, one per benchmark; `write_description_file` writes exactly this layout)::

    format: cdtg-descriptions/1
    benchmark: isic                          # the file's stem
    modality: dermoscopy images of skin lesions
    provenance: {author, model, method, template, date, ...}   # who/what wrote the text, from which template
    fallback: generic                        # optional: unknown classes get "A photo of a <name>." (with a warning)
    captions_only: true                      # optional: captions without attribute sentences (imported reference
                                             # captions, scripts/import_captions.py); then no `attributes` anywhere
    background: {caption, attributes}        # the background of this domain
    classes:                                 # in the dataset loader's order
      - name: seborrheic keratosis
        aliases: [sk]                        # optional extra spellings
        caption: A photo of seborrheic keratosis, ...
        attributes: {what: ..., shape: ..., size: ..., colour: ..., texture: ..., boundary: ..., context: ...}

Every caption and attribute is one non-empty line of at most MAX_WORDS words (CLIP reads 77 tokens and would
truncate longer text silently; the shipped texts use at most 46 tokens); a class needs at least MIN_ATTRIBUTES
attributes. Class names are looked up after normalisation (case, Unicode form, and spaces / underscores / hyphens
ignored) over names and aliases; an unknown class is a UserError unless the file declares `fallback: generic`, in
which case it gets the generic caption (its only attribute is that caption) and a warning. No network calls here.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import string
import unicodedata
import warnings
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from common.errors import UserError

TEXT_DIR = Path(__file__).resolve().parent
DESCRIPTIONS_DIR = TEXT_DIR / 'descriptions'
TEMPLATE_PATH = TEXT_DIR / 'template.yaml'
FORMAT = 'cdtg-descriptions/1'
MIN_ATTRIBUTES = 3
MAX_WORDS = 45       # ~60 CLIP tokens; a cheap guard, the text encoder still sees the real token count
FALLBACKS = ('generic',)
PROVENANCE_KEYS = ('author', 'model', 'method', 'template', 'date')
TOP_KEYS = {'format', 'benchmark', 'modality', 'provenance', 'fallback', 'captions_only', 'background', 'classes'}
CLASS_KEYS = {'name', 'aliases', 'caption', 'attributes'}
TEMPLATE_KEYS = {'version', 'questions', 'caption_style', 'system', 'user', 'background_user'}
TEMPLATE_FIELDS = ('class_name', 'benchmark', 'modality', 'questions', 'json_format', 'caption_style')


# --- names and hashes -------------------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    r"""Lookup key of a class name: NFKC, case-folded, with spaces, underscores and hyphens removed
    ('Seborrheic_Keratosis', 'seborrheic keratosis' and 'diningtable' / 'dining table' meet)."""
    return re.sub(r'[\s_\-]+', '', unicodedata.normalize('NFKC', str(name)).casefold())


def text_hash(text: str) -> str:
    r"""SHA-256 (hex) of one exact text, UTF-8: the key under which an embedding of that text may be cached."""
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    r"""SHA-256 (hex) of an ordered list of texts (JSON-encoded, so no two lists share a hash by concatenation)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode('utf-8')).hexdigest()


def generic_caption(name: str) -> str:
    r"""The fallback caption "A photo of a <name>." ('an' before a vowel; underscores read as spaces)."""
    readable = ' '.join(re.sub(r'[_]+', ' ', str(name)).split())
    article = 'an' if readable[:1].lower() in 'aeiou' and readable else 'a'
    return f'A photo of {article} {readable}.'


# --- one class --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassText:
    r"""The text of one class (or of the background): a caption and attribute sentences answering the template.

    `generic` marks a fallback built from the bare class name; its only attribute is the caption itself. A class
    of a captions-only file has no attributes.
    """
    name: str
    caption: str
    attributes: tuple[str, ...]
    attribute_keys: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    generic: bool = False

    @property
    def texts(self) -> list[str]:
        r"""Caption followed by the attribute sentences."""
        return [self.caption, *self.attributes]

    @property
    def content_hash(self) -> str:
        r"""Stable hash of the exact caption and attribute texts (changes whenever any of them changes)."""
        return texts_hash(self.texts)

    @classmethod
    def fallback(cls, name: str) -> ClassText:
        caption = generic_caption(name)
        return cls(name=str(name), caption=caption, attributes=(caption,), attribute_keys=('caption',), generic=True)


# --- the file ---------------------------------------------------------------------------------------------------
class Descriptions:
    r"""The descriptions of one benchmark: per-class captions and attributes, the domain's background, provenance.

    Look-ups accept any spelling that normalises to a class name or alias (see `normalize_name`).
    """

    def __init__(self, path: Path, benchmark: str, modality: str, provenance: dict[str, str], background: ClassText,
                 classes: Sequence[ClassText], fallback: str | None = None):
        self.path = path
        self.benchmark = benchmark
        self.modality = modality
        self.provenance = dict(provenance)
        self.background = background
        self.classes = tuple(classes)
        self.fallback = fallback
        self._index: dict[str, ClassText] = {}
        for entry in self.classes:
            for spelling in (entry.name, *entry.aliases):
                key = normalize_name(spelling)
                other = self._index.get(key)
                if other is not None and other is not entry:
                    raise UserError(f'{path}: the name or alias {spelling!r} of class {entry.name!r} is the same '
                                    f'(after normalisation) as one of class {other.name!r}; make them distinct')
                self._index[key] = entry

    def __repr__(self) -> str:
        return f'Descriptions({self.benchmark!r}, {len(self.classes)} classes, path={str(self.path)!r})'

    def __len__(self) -> int:
        return len(self.classes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_name(name) in self._index

    @property
    def class_names(self) -> list[str]:
        r"""Class names in file order (the loader's order)."""
        return [c.name for c in self.classes]

    def lookup(self, name: str) -> ClassText | None:
        r"""The described class for `name` (any normalised spelling or alias), or None."""
        return self._index.get(normalize_name(name))

    def get(self, name: str) -> ClassText:
        r"""The class text for `name`; an unknown class is a UserError, or the generic caption (with a warning) when
        the file declares `fallback: generic`."""
        return self.for_classes([name])[0]

    def for_classes(self, class_names: Iterable[str]) -> list[ClassText]:
        r"""Class texts for the dataset's class names, in the given (dataset) order. Classes without a description
        fall back to the generic caption only if the file allows it, with one warning counting them."""
        names = [str(n) for n in class_names]
        out: list[ClassText] = []
        missing: list[str] = []
        for name in names:
            entry = self.lookup(name)
            if entry is None:
                missing.append(name)
                entry = ClassText.fallback(name)
            out.append(entry)
        if missing and self.fallback != 'generic':
            raise UserError(self._unknown_message(missing))
        if missing:
            shown = ', '.join(repr(n) for n in missing[:5]) + (', ...' if len(missing) > 5 else '')
            warnings.warn(f'{self.path}: {len(missing)} of {len(names)} classes have no description and use the '
                          f'generic caption "{generic_caption("<name>")}" ({shown})', UserWarning, stacklevel=2)
        return out

    def _unknown_message(self, missing: list[str]) -> str:
        lines = [f'{self.path}: no description for class(es) {", ".join(repr(n) for n in missing[:10])}'
                 f'{" ..." if len(missing) > 10 else ""} of benchmark {self.benchmark!r}.']
        keys = {normalize_name(c.name): c.name for c in self.classes}
        for name in missing[:10]:
            close = difflib.get_close_matches(normalize_name(name), list(keys), n=1, cutoff=0.75)
            if close:
                lines.append(f'  {name!r}: did you mean {keys[close[0]]!r}?')
        known = ', '.join(repr(n) for n in self.class_names[:25]) + (' ...' if len(self.classes) > 25 else '')
        lines.append(f'Known classes: {known or "(none)"}. Add the class (or an alias) to the file, or regenerate it '
                     'with scripts/generate_descriptions.py.')
        return '\n'.join(lines)

    def caption(self, name: str) -> str:
        return self.get(name).caption

    def attributes(self, name: str) -> list[str]:
        return list(self.get(name).attributes)

    def texts(self, name: str) -> list[str]:
        r"""Caption followed by the attribute sentences of `name`."""
        return self.get(name).texts

    def content_hash(self, name: str) -> str:
        return self.get(name).content_hash

    @property
    def background_caption(self) -> str:
        return self.background.caption

    @property
    def background_attributes(self) -> list[str]:
        return list(self.background.attributes)


# --- loading and validation -------------------------------------------------------------------------------------
def available_benchmarks(root: Path | None = None) -> list[str]:
    r"""Benchmarks that have a description file under `root` (default text/descriptions/)."""
    folder = Path(root) if root is not None else DESCRIPTIONS_DIR
    return sorted(p.stem for p in folder.glob('*.yaml')) if folder.is_dir() else []


def load_descriptions(benchmark: str, root: Path | None = None) -> Descriptions:
    r"""Load and validate `<root>/<benchmark>.yaml` (root defaults to text/descriptions/)."""
    folder = Path(root) if root is not None else DESCRIPTIONS_DIR
    path = folder / f'{benchmark}.yaml'
    if not path.is_file():
        have = ', '.join(available_benchmarks(folder)) or 'none'
        raise UserError(f'no description file for benchmark {benchmark!r}: {path} does not exist (available: {have}); '
                        f'write one with scripts/generate_descriptions.py --benchmark {benchmark} --out {path}')
    desc = load_description_file(path)
    if desc.benchmark != benchmark:
        raise UserError(f'{path}: declares benchmark {desc.benchmark!r} but is the file of {benchmark!r}; '
                        'fix the `benchmark` field or rename the file')
    return desc


def load_description_file(path: str | Path) -> Descriptions:
    r"""Load and validate one description file; every problem is a UserError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except OSError as err:
        raise UserError(f'cannot read description file {path}: {err}') from err
    except UnicodeDecodeError as err:
        raise UserError(f'description file {path} is not UTF-8 text: {err}') from err
    except yaml.YAMLError as err:
        raise UserError(f'description file {path} is not valid YAML: {err}') from err
    return parse_descriptions(data, path)


def parse_descriptions(data: Any, path: Path) -> Descriptions:
    r"""Validate the parsed YAML of a description file (see the module docstring for the layout)."""
    def fail(msg: str) -> UserError:
        return UserError(f'description file {path}: {msg}')

    if not isinstance(data, dict):
        raise fail(f'must be a mapping with the keys {", ".join(sorted(TOP_KEYS))}')
    unknown = sorted(set(map(str, data)) - TOP_KEYS)
    if unknown:
        raise fail(f'unknown key(s) {", ".join(unknown)}; valid keys: {", ".join(sorted(TOP_KEYS))}')
    if data.get('format') != FORMAT:
        raise fail(f'`format` must be {FORMAT!r} (got {data.get("format")!r})')
    benchmark = _line(data.get('benchmark'), 'benchmark', fail, max_words=None)
    modality = _line(data.get('modality'), 'modality', fail, max_words=None)
    provenance = _provenance(data.get('provenance'), fail)
    fallback = data.get('fallback')
    if fallback is not None and fallback not in FALLBACKS:
        raise fail(f'`fallback` must be one of {", ".join(FALLBACKS)} or absent (got {fallback!r})')
    captions_only = data.get('captions_only', False)
    if not isinstance(captions_only, bool):
        raise fail(f'`captions_only` must be true or false (got {captions_only!r})')
    if 'background' not in data:
        raise fail('missing `background` (caption and attributes of this domain\'s background)')
    background = _entry({'name': 'background', **_mapping(data['background'], 'background', fail)}, 'background',
                        fail, captions_only)
    classes = data.get('classes')
    if classes is None:
        classes = []
    if not isinstance(classes, list):
        raise fail('`classes` must be a list of class entries')
    if not classes and fallback is None:
        raise fail('`classes` is empty; describe the classes or declare `fallback: generic`')
    entries = [_entry(_mapping(item, f'classes[{i}]', fail), f'classes[{i}]', fail, captions_only)
               for i, item in enumerate(classes)]
    return Descriptions(path, benchmark, modality, provenance, background, entries, fallback)


def _mapping(value: Any, where: str, fail) -> dict:
    if not isinstance(value, dict):
        raise fail(f'{where} must be a mapping (got {type(value).__name__})')
    return value


def _line(value: Any, where: str, fail, max_words: int | None = MAX_WORDS) -> str:
    if isinstance(value, (date, datetime)):    # YAML reads an unquoted 2026-01-31 as a date
        value = value.isoformat()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise fail(f'{where} must be a string (got {"nothing" if value is None else type(value).__name__})')
    text = value.strip()
    if not text:
        raise fail(f'{where} is empty')
    if '\n' in text:
        raise fail(f'{where} must be a single line (got {text[:60]!r}...)')
    if max_words is not None and len(text.split()) > max_words:
        raise fail(f'{where} has {len(text.split())} words; keep it to at most {max_words} (CLIP reads 77 tokens '
                   f'and would cut it silently): {text[:60]!r}...')
    return text


def _provenance(value: Any, fail) -> dict[str, str]:
    prov = _mapping(value, 'provenance', fail)
    missing = [k for k in PROVENANCE_KEYS if k not in prov]
    if missing:
        raise fail(f'provenance lacks {", ".join(missing)} (required: {", ".join(PROVENANCE_KEYS)})')
    return {str(k): _line(v, f'provenance.{k}', fail, max_words=None) for k, v in prov.items()}


def _entry(item: dict, where: str, fail, captions_only: bool = False) -> ClassText:
    unknown = sorted(set(map(str, item)) - CLASS_KEYS)
    if unknown:
        raise fail(f'{where}: unknown key(s) {", ".join(unknown)}; valid keys: {", ".join(sorted(CLASS_KEYS))}')
    name = _line(item.get('name'), f'{where}.name', fail, max_words=None)
    where = f'{where} ({name})'
    if 'caption' not in item:
        raise fail(f'{where}: missing caption')
    caption = _line(item['caption'], f'{where}.caption', fail)
    aliases = item.get('aliases') or []
    if not isinstance(aliases, list):
        raise fail(f'{where}: `aliases` must be a list of strings')
    aliases = tuple(_line(a, f'{where}.aliases[{i}]', fail, max_words=None) for i, a in enumerate(aliases))
    if captions_only:
        if 'attributes' in item:
            raise fail(f'{where}: a captions_only file has no `attributes` (remove them, or captions_only)')
        return ClassText(name=name, caption=caption, attributes=(), attribute_keys=(), aliases=aliases)
    attrs = item.get('attributes')
    if not isinstance(attrs, dict):
        raise fail(f'{where}: `attributes` must map each template question key to one sentence '
                   f'(got {"nothing" if attrs is None else type(attrs).__name__})')
    if len(attrs) < MIN_ATTRIBUTES:
        raise fail(f'{where}: has {len(attrs)} attribute sentence(s); at least {MIN_ATTRIBUTES} are required')
    keys = tuple(str(k) for k in attrs)
    bad = [k for k in keys if not re.fullmatch(r'[a-z][a-z0-9_]*', k)]
    if bad:
        raise fail(f'{where}: attribute key(s) {", ".join(map(repr, bad))} must be lower-case identifiers '
                   '(the template\'s question keys)')
    sentences = tuple(_line(v, f'{where}.attributes.{k}', fail) for k, v in zip(keys, attrs.values()))
    return ClassText(name=name, caption=caption, attributes=sentences, attribute_keys=keys, aliases=aliases)


# --- writing (used by scripts/generate_descriptions.py) ---------------------------------------------------------
def class_record(name: str, caption: str, attributes: dict[str, str] | None, aliases: Sequence[str] = ()) -> dict:
    r"""One `classes` entry in file layout (attributes None: an entry of a captions-only file)."""
    record: dict[str, Any] = {'name': name}
    if aliases:
        record['aliases'] = list(aliases)
    record['caption'] = caption
    if attributes is not None:
        record['attributes'] = dict(attributes)
    return record


@dataclass(frozen=True)
class FileSource:
    r"""What a description file describes and where its texts come from: the benchmark, its imaging modality, the
    provenance record (key -> value: generator, template, date, ...) and the optional fallback benchmark."""
    benchmark: str
    modality: str
    provenance: dict[str, str]
    fallback: str | None = None


def write_description_file(path: str | Path, source: FileSource, background: dict[str, Any], classes: Sequence[dict],
                           header: str = '', captions_only: bool = False) -> Descriptions:
    r"""Write a description file in the layout `load_description_file` reads, validate it by loading it back (a
    file that would not load is never left behind), and return the loaded descriptions. With `captions_only`,
    the background and the classes have captions and no attributes."""
    path = Path(path)
    data: dict[str, Any] = {'format': FORMAT, 'benchmark': source.benchmark, 'modality': source.modality,
                            'provenance': dict(source.provenance)}
    if source.fallback is not None:
        data['fallback'] = source.fallback
    if captions_only:
        data['captions_only'] = True
        data['background'] = {'caption': background['caption']}
    else:
        data['background'] = {'caption': background['caption'], 'attributes': dict(background['attributes'])}
    data['classes'] = [dict(c) for c in classes]
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=4096, default_flow_style=False)
    comment = ''.join(f'# {line}'.rstrip() + '\n' for line in header.splitlines())
    parse_descriptions(yaml.safe_load(body), path)     # validate before touching the disk
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(comment + body, encoding='utf-8')
        tmp.replace(path)
    except OSError as err:
        raise UserError(f'cannot write description file {path}: {err}') from err
    return load_description_file(path)


# --- the question template --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    r"""The standardized question template (text/template.yaml): chat messages asking for one class's description."""
    path: Path
    version: int
    questions: tuple[tuple[str, str], ...]     # (attribute key, question)
    caption_style: str
    system: str
    user: str
    background_user: str

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.questions]

    def json_format(self) -> str:
        r"""The JSON object the model must answer with."""
        attrs = ', '.join(f'"{k}": "<one sentence>"' for k in self.keys)
        return '{"caption": "A photo of ...", "attributes": {' + attrs + '}}'

    def messages(self, class_name: str, benchmark: str, modality: str, background: bool = False) -> list[dict]:
        r"""Chat messages [system, user] for one class (or, with `background`, for the domain's background)."""
        fields = {'class_name': class_name, 'benchmark': benchmark, 'modality': modality,
                  'json_format': self.json_format(), 'caption_style': self.caption_style}
        questions = '\n'.join(f'{i}. ({k}) {string.Template(q).substitute(fields)}'
                              for i, (k, q) in enumerate(self.questions, 1))
        fields['questions'] = questions
        user = self.background_user if background else self.user
        return [{'role': 'system', 'content': string.Template(self.system).substitute(fields)},
                {'role': 'user', 'content': string.Template(user).substitute(fields)}]


def load_template(path: str | Path | None = None) -> Template:
    r"""Load and validate the question template (default text/template.yaml)."""
    path = Path(path) if path is not None else TEMPLATE_PATH

    def fail(msg: str) -> UserError:
        return UserError(f'template {path}: {msg}')

    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except OSError as err:
        raise UserError(f'cannot read template {path}: {err}') from err
    except yaml.YAMLError as err:
        raise fail(f'not valid YAML: {err}') from err
    data = _mapping(data, 'the file', fail)
    missing = sorted(TEMPLATE_KEYS - set(data))
    if missing:
        raise fail(f'missing key(s) {", ".join(missing)}')
    if not isinstance(data['version'], int) or isinstance(data['version'], bool):
        raise fail('`version` must be an integer')
    if not isinstance(data['questions'], list) or len(data['questions']) < MIN_ATTRIBUTES:
        raise fail(f'`questions` must be a list of at least {MIN_ATTRIBUTES} {{key, question}} entries')
    questions = []
    for i, q in enumerate(data['questions']):
        q = _mapping(q, f'questions[{i}]', fail)
        key = _line(q.get('key'), f'questions[{i}].key', fail, max_words=1)
        if not re.fullmatch(r'[a-z][a-z0-9_]*', key) or key == 'caption':
            raise fail(f'questions[{i}].key {key!r} must be a lower-case identifier other than "caption"')
        questions.append((key, _line(q.get('question'), f'questions[{i}].question', fail, max_words=None)))
    if len({k for k, _ in questions}) != len(questions):
        raise fail('question keys must be distinct')
    texts = {}
    for key in ('caption_style', 'system', 'user', 'background_user'):
        if not isinstance(data[key], str) or not data[key].strip():
            raise fail(f'`{key}` must be a non-empty string')
        texts[key] = data[key].strip()
    template = Template(path=path, version=data['version'], questions=tuple(questions), **texts)
    try:    # a typo in a placeholder fails here, not in the middle of a paid generation run
        for background in (False, True):
            template.messages('x', 'x', 'x', background=background)
    except (KeyError, ValueError) as err:
        raise fail(f'bad placeholder {err}; the valid ones are ${", $".join(TEMPLATE_FIELDS)} ($$ for "$")') from err
    return template
