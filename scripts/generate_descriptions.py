r"""Write a CD-TG description file by asking an OpenAI-compatible chat model the questions of text/template.yaml.

    export OPENAI_API_KEY=sk-...                       # and OPENAI_BASE_URL for another OpenAI-compatible server
    python scripts/generate_descriptions.py --benchmark isic --out text/descriptions/isic.yaml --force
    python scripts/generate_descriptions.py --benchmark my-set --classes "left atrium,myocardium" \
        --modality "cardiac cine MRI" --out my-set.yaml
    python scripts/generate_descriptions.py --benchmark isic --dry-run     # print the requests, send nothing

One chat-completions request (POST {base-url}/chat/completions) per class and one for the domain's background. The
model must answer with a JSON object (caption + one sentence per template question); every answer is validated and
a malformed one is asked again up to --retries times. The file is only written when every class has a valid
answer, in exactly the layout text/descriptions.py loads, and is loaded back before the command returns. Classes
come from --classes, else from the benchmark's existing description file (keeping its aliases), else from the
dataset registry. Standard library HTTP only; this is the only place in the project that talks to a network.
"""
import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import bounded, parse_with_config  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from text.descriptions import (DESCRIPTIONS_DIR, MAX_WORDS, Descriptions, FileSource, Template,  # noqa: E402
                               class_record, load_description_file, load_template, write_description_file)

DEFAULT_BASE_URL = 'https://api.openai.com/v1'
CAPTION_PREFIX = 'a photo of'


class RetryableError(UserError):
    r"""A failure worth asking again: a malformed answer, HTTP 429/5xx or a timeout (`wait`: back off first)."""

    def __init__(self, message: str, wait: bool = False):
        super().__init__(message)
        self.wait = wait


# --- HTTP -------------------------------------------------------------------------------------------------------
def _snippet(raw: bytes | str, n: int = 300) -> str:
    text = raw.decode('utf-8', 'replace') if isinstance(raw, bytes) else raw
    text = ' '.join(text.split())
    return text[:n] + ('...' if len(text) > n else '')


def public_url(url: str) -> str:
    r"""The URL without user:password or query string (what provenance and messages may show)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit('@', 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, '', ''))


def post_chat(endpoint: str, api_key: str, payload: dict, timeout: float, what: str) -> tuple[str, str | None]:
    r"""POST one chat-completions request; returns (message content, model name the server reports)."""
    request = urllib.request.Request(endpoint, data=json.dumps(payload).encode('utf-8'), method='POST', headers={
        'Content-Type': 'application/json', 'Accept': 'application/json', 'Authorization': f'Bearer {api_key}'})
    shown = public_url(endpoint)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:
        try:
            detail = _snippet(err.read())
        except OSError:
            detail = ''
        msg = f'{shown} answered HTTP {err.code} {err.reason} for {what}: {detail or "(empty body)"}'
        if err.code in (401, 403):
            raise UserError(msg + '\nCheck --api-key / OPENAI_API_KEY.') from err
        if err.code == 404:
            raise UserError(msg + '\nCheck --base-url / OPENAI_BASE_URL (it must end before /chat/completions, '
                            f'e.g. {DEFAULT_BASE_URL}) and --model.') from err
        if err.code == 429 or err.code >= 500:
            raise RetryableError(msg, wait=True) from err
        raise UserError(msg) from err
    except (TimeoutError, socket.timeout) as err:
        raise RetryableError(f'{shown} did not answer within {timeout:g} s for {what}; raise --timeout or check the '
                             'server', wait=True) from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise RetryableError(f'{shown} did not answer within {timeout:g} s for {what}; raise --timeout or check '
                                 'the server', wait=True) from err
        raise UserError(f'cannot reach {shown} for {what}: {err.reason}. Check --base-url / OPENAI_BASE_URL and the '
                        'network.') from err
    except OSError as err:      # connection reset mid-answer and the like
        raise RetryableError(f'the connection to {shown} failed for {what}: {err}', wait=True) from err
    try:
        data = json.loads(raw)
        content = data['choices'][0]['message']['content']
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise RetryableError(f'{shown} returned a response that is not an OpenAI chat completion for {what} '
                             f'(expected JSON with choices[0].message.content): {_snippet(raw)}') from err
    if not isinstance(content, str):
        raise RetryableError(f'{shown} returned no text content for {what}: {_snippet(raw)}')
    served = data.get('model') if isinstance(data.get('model'), str) else None
    return content, served


# --- the model's answer -----------------------------------------------------------------------------------------
def _sentence(value, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'"{field}" must be a non-empty string')
    text = ' '.join(value.split())      # one line; the model sometimes wraps long sentences
    if len(text.split()) > MAX_WORDS:
        raise ValueError(f'"{field}" has {len(text.split())} words (at most {MAX_WORDS}; CLIP reads 77 tokens)')
    return text


def parse_answer(content: str, keys: list[str]) -> tuple[str, dict[str, str]]:
    r"""(caption, {key: sentence}) from the model's reply; ValueError says what is wrong with it.

    Tolerates a code fence or prose around the JSON object; requires the caption style and every template key.
    """
    text = content.strip()
    fenced = re.fullmatch(r'```[a-zA-Z]*\s*(.*?)\s*```', text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    start, end = text.find('{'), text.rfind('}')
    if start < 0 or end < start:
        raise ValueError('no JSON object in the answer')
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError as err:
        raise ValueError(f'invalid JSON ({err.msg} at character {err.pos})') from err
    if not isinstance(obj, dict):
        raise ValueError('the JSON is not an object')
    caption = _sentence(obj.get('caption'), 'caption')
    if not caption.lower().startswith(CAPTION_PREFIX):
        raise ValueError(f'the caption does not follow the style "A photo of ...": {caption[:80]!r}')
    attrs = obj.get('attributes')
    if not isinstance(attrs, dict):
        raise ValueError('"attributes" must be an object mapping each question key to one sentence')
    missing = [k for k in keys if k not in attrs]
    if missing:
        raise ValueError(f'"attributes" lacks the key(s) {", ".join(missing)}')
    return caption, {k: _sentence(attrs[k], f'attributes.{k}') for k in keys}


def ask(args, template: Template, endpoint: str, name: str, modality: str, background: bool,
        served: set[str]) -> tuple[str, dict[str, str]]:
    r"""One validated answer for a class (or the background), asking again on retryable failures."""
    what = 'the background' if background else f'class {name!r}'
    payload = {'model': args.model, 'temperature': args.temperature,
               'messages': template.messages(name, args.benchmark, modality, background=background)}
    attempt = 0
    while True:
        try:
            content, model = post_chat(endpoint, args.api_key, payload, args.timeout, what)
            try:
                answer = parse_answer(content, template.keys)
            except ValueError as err:
                raise RetryableError(f'the answer of {public_url(endpoint)} (model {args.model}) for {what} is '
                                     f'malformed: {err}. The answer began: {_snippet(content, 200)!r}') from err
            if model:
                served.add(model)
            return answer
        except RetryableError as err:
            if attempt == args.retries:
                tries = f' (gave up after {attempt + 1} attempts)' if attempt else ''
                raise UserError(f'{err}{tries}') from err
            print(f'warning: {err}; asking again ({attempt + 1}/{args.retries})', file=sys.stderr)
            if err.wait:
                time.sleep(min(2.0 ** attempt, 30.0))
            attempt += 1


# --- the class list ---------------------------------------------------------------------------------------------
def registry_classes(benchmark: str) -> list[str] | None:
    r"""The class names a registered dataset declares without reading data (`class_names_` / module `CLASSES`)."""
    from data import DATASETS     # imports torch; only needed when no class list was given
    cls = DATASETS.get(benchmark)
    if cls is None:
        return None
    names = getattr(cls, 'class_names_', None) or getattr(sys.modules[cls.__module__], 'CLASSES', None)
    return [str(n) for n in names] if names else None


def resolve_classes(args) -> tuple[list[tuple[str, list[str]]], str | None, Descriptions | None]:
    r"""[(name, aliases)], the modality of the source file (if any) and that file."""
    source = Path(args.classes_from) if args.classes_from else DESCRIPTIONS_DIR / f'{args.benchmark}.yaml'
    existing = load_description_file(source) if source.is_file() else None
    if args.classes_from and existing is None:
        raise UserError(f'--classes-from {source} does not exist')
    if args.classes is not None:
        names = [n.strip() for n in args.classes.split(',') if n.strip()]
        if not names and not args.fallback_generic:
            raise UserError('--classes is empty; list the classes (comma-separated) or pass --fallback-generic')
        keep = {c.name: list(c.aliases) for c in existing.classes} if existing else {}
        return [(n, keep.get(n, [])) for n in names], existing.modality if existing else None, existing
    if existing is not None:
        return [(c.name, list(c.aliases)) for c in existing.classes], existing.modality, existing
    names = registry_classes(args.benchmark)
    if names is None:
        raise UserError(f'no class list for benchmark {args.benchmark!r}: there is no {source} and the dataset '
                        'registry does not declare its classes; pass --classes "a,b,c"')
    return [(n, []) for n in names], None, None


# --- main -------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--benchmark', required=True, help='benchmark name (the file stem, e.g. isic)')
    p.add_argument('--out', default=None, help='description file to write (required unless --dry-run)')
    p.add_argument('--force', action='store_true', help='overwrite --out if it exists')
    p.add_argument('--classes', default=None,
                   help='comma-separated class names in the loader\'s order (default: the classes of '
                        '--classes-from, else of text/descriptions/<benchmark>.yaml, else the dataset registry)')
    p.add_argument('--classes-from', default=None, help='description file whose classes (and aliases) to describe')
    p.add_argument('--modality', '--domain', dest='modality', default=None,
                   help='imaging modality / domain inserted into the questions (default: that of the source file)')
    p.add_argument('--fallback-generic', action='store_true',
                   help='let classes without a description use "A photo of a <name>." (e.g. FSS-1000)')
    p.add_argument('--base-url', default=os.environ.get('OPENAI_BASE_URL') or DEFAULT_BASE_URL,
                   help=f'OpenAI-compatible API root (env OPENAI_BASE_URL; default {DEFAULT_BASE_URL})')
    p.add_argument('--model', default='gpt-4', help='chat model name (default gpt-4, as in the paper)')
    p.add_argument('--api-key', default=os.environ.get('OPENAI_API_KEY'),
                   help='API key sent as "Authorization: Bearer KEY" (env OPENAI_API_KEY)')
    bounded(p, '--temperature', float, 0.2, low=0, high=2)
    bounded(p, '--timeout', float, 120.0, low=0, low_open=True, help='seconds to wait for each answer')
    bounded(p, '--retries', int, 2, low=0,
            help='extra attempts after a malformed answer, HTTP 429/5xx or a timeout (default 2)')
    p.add_argument('--template', default=None, help='question template (default text/template.yaml)')
    p.add_argument('--dry-run', action='store_true', help='print the requests as JSON lines and send nothing')
    return parse_with_config(p, argv)


def main(argv=None) -> Descriptions | None:
    args = parse_args(argv)
    template = load_template(args.template)
    classes, source_modality, existing = resolve_classes(args)
    modality = args.modality or source_modality
    if not modality:
        raise UserError('pass --modality (e.g. "dermoscopy images of skin lesions"): there is no existing description '
                        f'file for {args.benchmark!r} to take it from')
    fallback = 'generic' if args.fallback_generic or (existing is not None and existing.fallback) else None
    if not classes and fallback is None:
        raise UserError(f'no classes to describe for {args.benchmark!r}; pass --classes or --fallback-generic')
    endpoint = args.base_url.rstrip('/') + '/chat/completions'
    if args.dry_run:
        for name, background in [('background', True)] + [(n, False) for n, _ in classes]:
            print(json.dumps({'url': public_url(endpoint), 'model': args.model, 'temperature': args.temperature,
                              'messages': template.messages(name, args.benchmark, modality, background=background)}))
        return None
    if args.out is None:
        raise UserError('pass --out FILE (or --dry-run)')
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f'{out} exists; pass --force to overwrite it')
    if not args.api_key:
        raise UserError('no API key: pass --api-key or set OPENAI_API_KEY (any non-empty string for a local server '
                        'that does not check keys)')

    served: set[str] = set()
    print(f'asking {args.model} at {public_url(endpoint)} about {len(classes)} classes of {args.benchmark} '
          '+ the background', file=sys.stderr)
    caption, attrs = ask(args, template, endpoint, 'background', modality, True, served)
    background = {'caption': caption, 'attributes': attrs}
    records = []
    for i, (name, aliases) in enumerate(classes, 1):
        caption, attrs = ask(args, template, endpoint, name, modality, False, served)
        records.append(class_record(name, caption, attrs, aliases))
        print(f'  [{i}/{len(classes)}] {name}', file=sys.stderr)

    try:
        template_ref = str(template.path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        template_ref = str(template.path)
    provenance = {
        'author': f'{args.model} via scripts/generate_descriptions.py',
        'model': args.model + (f' (served as {", ".join(sorted(served))})' if served else ''),
        'method': ('one chat-completions request per class and one for the background, answering the template; '
                   'answers validated and written unedited except for whitespace'),
        'template': template_ref,
        'template_version': str(template.version),
        'date': datetime.now(timezone.utc).date().isoformat(),
        'endpoint': public_url(args.base_url),
        'temperature': str(args.temperature),
    }
    header = (f'CD-TG Text Generation Unit: class descriptions for the {args.benchmark!r} benchmark, generated by '
              f'{args.model}.\nLayout, validation and lookup: text/descriptions.py. Questions: {template_ref}.')
    desc = write_description_file(out, FileSource(args.benchmark, modality, provenance, fallback), background, records,
                                  header)
    print(f'wrote {out} ({len(desc.classes)} classes)', file=sys.stderr)
    return desc


if __name__ == '__main__':
    run_cli(main)
