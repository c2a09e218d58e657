"""Build fastslim's documentation site into `_docs/`, offline.

The notebooks in `nbs/` are committed without outputs, so the build runs a scratch copy of each one with nbdev's
own runner (`nbdev.test.test_nb(..., save=True)`, skipping the `tst_flags` cells as the tests do); the committed
notebooks stay untouched. `tests/test_notebooks.py` runs each notebook the same way (`run_nb`) and keeps every green
run under `.nbruns/`, keyed by the site's inputs, the skipped flags and the installed versions: the build copies a
kept run instead of executing that notebook again. Before the run, nbdev's `add_show_docs` processor adds a `show_doc` for every undocumented
export, and every `show_doc` is pointed at `ParamTableRenderer`, so a callable whose parameters carry docments
comments gets a Type/Default/Details table under its signature (nbdev 3's own show_doc prints only the signature).
The executed copy then goes through nbdev's docs processors (`nbdev.processors.FilterDefaults`, what
`nbdev-proc-nbs` applies to build `_proc/`, less `exec_show_docs`, whose outputs the full run already made).

The processed pages are then rendered by one of two engines:

- `quarto`, when the `quarto` command is on PATH (as in `.github/workflows/deploy.yaml`): nbdev's Quarto path, the
  renderer `nbdev-docs` calls (`nbdev.quarto_render.render_quarto`), with `nbs/_quarto.yml`, `nbs/nbdev.yml` and
  `nbs/styles.css`. (Plain `nbdev-docs` would render the committed notebooks, which have no outputs: no plots.)
- `pandoc` otherwise (Quarto cannot be installed offline): each processed notebook becomes pandoc markdown
  (show_doc markdown as is, plots as PNG files under `_docs/media/`) rendered with one HTML template,
  `nbs/styles.css` and a sidebar listing every page.

Pages are named as nbdev names them (`nbdev.config.nbpath2html`: `00_core.ipynb` -> `core.html`). The sidebar
lists `index` first, then the module notebooks in notebook order, then `nbs/tutorials/`, each titled by its
notebook's first `# Title` heading. `_docs/.build.json` holds a hash of every input, so `tests/test_docs_site.py`
can tell whether `_docs/` is current.

    python tools/build_docs.py                          # -> _docs/ (quarto if installed, else pandoc)
    python tools/build_docs.py --engine pandoc --dest /tmp/site
"""
from __future__ import annotations
import base64, fcntl, hashlib, html, json, os, re, shutil, subprocess, sys, tempfile
from contextlib import contextmanager
from pathlib import Path
from fastcore.script import call_parse
from fastcore.parallel import parallel
from fastcore.docments import DocmentTbl
from nbdev.showdoc import BasicMarkdownRenderer

ROOT = Path(__file__).resolve().parents[1]
STAMP = '.build.json'
ASSETS = {'.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp'}
INPUTS = {'.ipynb', '.yml', '.yaml', '.css', '.qmd', '.md'} | ASSETS

# --- show_doc with a parameter table ---------------------------------------------------------------------------------
class ParamTableRenderer(BasicMarkdownRenderer):
    "nbdev's `show_doc` markdown (source link, name, signature, docstring), then a parameter table if there are docments"
    def _repr_markdown_(self):
        md = super()._repr_markdown_()
        try: tbl = DocmentTbl(self.sym)._repr_markdown_()
        except Exception: tbl = ''
        return f'{md}\n\n{tbl}\n' if tbl else md

_re_show_doc = re.compile(r'^(show_doc\((?!.*\brenderer\s*=).*)\)\s*$', re.MULTILINE)

def table_show_docs(cell):
    "nbdev processor: render each one-line `show_doc(...)` call with `ParamTableRenderer`"
    if cell.cell_type == 'code' and 'show_doc' in (cell.source or ''):
        cell.source = _re_show_doc.sub(rf"\1, renderer='{Path(__file__).stem}.ParamTableRenderer')", cell.source)

def prepare_nb(path):
    "Before the run: add nbdev's show_doc cells for undocumented exports and render every show_doc with a table"
    from nbdev.process import NBProcessor, mk_cell
    from nbdev.processors import add_show_docs
    from fastcore.nbio import write_nb
    nb = NBProcessor(path, procs=[add_show_docs, table_show_docs], rm_directives=False, process=True).nb
    for c in nb.cells: c.pop('has_sd', None)
    nb.cells.insert(0, mk_cell('#| hide\nfrom nbdev.showdoc import show_doc'))  # as `exec_show_docs` does first
    write_nb(nb, path)

def doc_filter():
    "nbdev's `FilterDefaults` less `exec_show_docs`: the full run has already produced every show_doc output"
    from nbdev.processors import FilterDefaults, exec_show_docs
    class DocsFilter(FilterDefaults):
        def base_procs(self): return [p for p in super().base_procs() if p is not exec_show_docs]
    return DocsFilter

# --- pages and their order -------------------------------------------------------------------------------------------
def nb_title(nb_path):
    "The text of the first `# Title` heading in the notebook at `nb_path` (its file stem if it has none)"
    for c in json.loads(Path(nb_path).read_text(encoding='utf-8'))['cells']:
        if c['cell_type'] != 'markdown': continue
        for line in _text(c['source']).splitlines():
            if line.startswith('# '): return line[2:].strip()
    return Path(nb_path).stem

def doc_pages(nbs=None):
    "One dict per page in sidebar order: `src` (notebook path relative to `nbs`), `html` (page path), `title`"
    from nbdev.config import nbpath2html
    nbs = Path(nbs or ROOT/'nbs')
    def _shown(p): return not any(o.startswith(('_', '.')) for o in p.relative_to(nbs).parts)
    top = sorted((p for p in nbs.glob('*.ipynb') if _shown(p)), key=lambda p: (p.stem != 'index', p.name))
    tuts = sorted(p for p in (nbs/'tutorials').glob('*.ipynb') if _shown(p))
    return [dict(src=p.relative_to(nbs).as_posix(), html=nbpath2html(p.relative_to(nbs)).as_posix(), title=nb_title(p),
                 tutorial=p in tuts) for p in top+tuts]

def build_hash(root=ROOT):
    "sha256 of every input of the site: the `nbs/` tree, the library and this script"
    root, h = Path(root), hashlib.sha256()
    files = [p for p in sorted((root/'nbs').rglob('*')) if p.is_file() and p.suffix.lower() in INPUTS
             and not any(o.startswith(('.', '_proc', '_docs')) for o in p.relative_to(root/'nbs').parts)]
    files += sorted((root/'fastslim').rglob('*.py')) + [Path(__file__).resolve()]   # subpackages too (fastslim/plan/)
    for p in files: h.update(p.resolve().relative_to(root).as_posix().encode() + b'\0' + p.read_bytes() + b'\0')
    return h.hexdigest()

def is_current(dest=None, engine=None):
    "Whether `dest` (default `_docs/`) holds a finished build of the current inputs (by `engine`, if given)"
    p = Path(dest or ROOT/'_docs')/STAMP
    if not p.exists(): return False
    s = json.loads(p.read_text())
    return s.get('hash') == build_hash() and engine in (None, s.get('engine'))

# --- one execution per notebook, shared by the tests and the build ---------------------------------------------------
RUNS = ROOT/'.nbruns'  # executed notebooks (gitignored): tests/test_notebooks.py keeps each green run here for the build
DEPS = ('torch', 'torchvision', 'timm', 'fastai', 'fastcore', 'nbdev', 'torch-pruning', 'onnxruntime', 'torchao')

def _version(pkg):
    from importlib.metadata import version, PackageNotFoundError
    try: return version(pkg)
    except PackageNotFoundError: return '-'

def run_key(rel, skip_flags, inputs=None):
    "Name of the kept run of notebook `rel` (its path under `nbs/`): the site's inputs, the skipped flags, the installed versions"
    parts = [inputs or build_hash(), rel, ' '.join(sorted(skip_flags)), *(f'{d}={_version(d)}' for d in DEPS)]
    return f"{rel.replace('/', '__')}.{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.ipynb"

@contextmanager
def run_lock(key):
    "Hold `key`'s lock: a build waits for the test that is running that notebook instead of running it a second time"
    RUNS.mkdir(exist_ok=True)
    with open(RUNS/f'{key}.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield

def keep_run(path, key):
    "Keep the executed notebook at `path` as `key` (written atomically), dropping that notebook's older runs"
    for old in RUNS.glob(key.rsplit('.', 2)[0] + '.*.ipynb*'):
        if old.name != f'{key}.lock': old.unlink(missing_ok=True)
    tmp = RUNS/f'.{key}.tmp'
    shutil.copy2(path, tmp)
    os.replace(tmp, RUNS/key)

def execute_nb(path, skip_flags):
    "Run the notebook at `path` in place as the site shows it (show_doc tables added), saving its outputs: (ok, seconds)"
    from nbdev.test import test_nb
    os.environ.setdefault('MPLBACKEND', 'Agg')
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so show_doc can import `build_docs.ParamTableRenderer`
    prepare_nb(path)
    return test_nb(path, skip_flags=skip_flags, save=True, basepath=ROOT)

def run_nb(nb, skip_flags):
    "Execute `nb` (a notebook under `nbs/`) in a hidden copy beside it, as the build would; keep the run if it is green"
    nb = Path(nb).resolve()
    key, copy = run_key(nb.relative_to(ROOT/'nbs').as_posix(), skip_flags), nb.with_name(f'.run-{nb.name}')
    with run_lock(key):
        shutil.copy2(nb, copy)
        try:
            ok, _ = execute_nb(copy, skip_flags)
            if ok: keep_run(copy, key)
        finally: copy.unlink(missing_ok=True)
    return ok

# --- execute (or reuse a kept run), then process with nbdev ----------------------------------------------------------
def _exec_and_proc(job, skip_flags, inputs):
    "Execute the scratch notebook `job[0]` (or copy the run the tests kept of it, `job[2]`), then process it into `job[1]`"
    src, dst, rel = job
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # one torch thread per notebook, as under pytest-xdist
    from nbdev.serve_drv import main as proc_nb
    os.chdir(ROOT)  # nbdev reads the project's config from the working directory
    key = run_key(rel, skip_flags, inputs)
    with run_lock(key):
        if (RUNS/key).exists():
            shutil.copy2(RUNS/key, src)
            print(f'  reused the tests\' run of {src.name}', flush=True)
        else:
            ok, secs = execute_nb(src, skip_flags)
            if not ok: return f'{src.name}: a cell failed (its traceback is above)'
            print(f'  ran {src.name} in {secs:.1f}s', flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    dst.parent.mkdir(parents=True, exist_ok=True)
    try: proc_nb((src, dst, doc_filter()))
    except Exception as e: return f'{src.name}: nbdev could not process it: {e}'

def process_nbs(pages, work, n_workers):
    "Execute a scratch copy of `nbs/` under `work/nbs` and process each page's notebook into `work/proc`"
    from nbdev.config import get_config
    scratch, proc = work/'nbs', work/'proc'
    shutil.copytree(ROOT/'nbs', scratch, ignore=shutil.ignore_patterns('.*', '_proc', '_docs'))
    for f in ('pyproject.toml', 'settings.ini'):  # nbdev finds the project's config from the notebooks' folder
        if (ROOT/f).exists(): shutil.copy2(ROOT/f, work/f)
    skip = str(get_config(ROOT).tst_flags or '').split()
    jobs = [(scratch/p['src'], proc/p['src'], p['src']) for p in pages]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_docs  # the workers are spawned: they find the job by this module's name, not as `__main__`
    # a fresh process per notebook: nothing one notebook imports or registers (e.g. timm models) leaks into the next
    errs = [e for e in parallel(build_docs._exec_and_proc, jobs, skip_flags=skip, inputs=build_hash(), n_workers=n_workers, method='spawn',
                                max_tasks_per_child=1) if e]
    if errs: raise SystemExit('Docs build failed:\n  ' + '\n  '.join(errs))
    for p in scratch.rglob('*'):  # images that the notebooks' markdown points at
        if p.is_file() and p.suffix.lower() in ASSETS:
            (proc/p.relative_to(scratch)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, proc/p.relative_to(scratch))
    return proc

# --- pandoc engine ---------------------------------------------------------------------------------------------------
def _text(x): return ''.join(x) if isinstance(x, list) else (x or '')
_re_ansi = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')
_re_directive = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')

def split_directives(src):
    "Quarto's `#| key: value` lines at the top of the code `src`, as a dict, and the code below them"
    lines, d = src.splitlines(), {}
    while lines and (m := _re_directive.match(lines[0])): d[m[1]] = m[2].strip('\'"').lower(); lines.pop(0)
    return d, '\n'.join(lines).strip('\n')

def _fence(text, cls):
    ticks = '`' * max(3, 1 + max((len(m) for m in re.findall(r'`+', text)), default=0))
    return f'{ticks} {{{cls}}}\n{text.rstrip()}\n{ticks}'

def output_md(o, save_media):
    "Pandoc markdown for one notebook output; `save_media(bytes, suffix)` stores an image and returns its URL"
    t = o.get('output_type')
    if t == 'stream': return _fence(_re_ansi.sub('', _text(o.get('text'))), f'.output .{o.get("name", "stdout")}')
    if t == 'error': return _fence(_re_ansi.sub('', '\n'.join(o.get('traceback', []))), '.output .error')
    data = o.get('data', {})
    for mime, suf in (('image/png', '.png'), ('image/jpeg', '.jpg'), ('image/gif', '.gif'), ('image/svg+xml', '.svg')):
        if mime not in data: continue
        raw = _text(data[mime])
        url = save_media(raw.encode() if suf == '.svg' else base64.b64decode(raw), suf)
        w = (o.get('metadata', {}).get(mime) or {}).get('width')  # a 'retina' PNG shows at half its pixel width
        return f'![]({url}){{#{Path(url).stem} .output-image' + (f' width={int(w)}' if w else '') + '}'
    if 'text/markdown' in data: return _text(data['text/markdown'])
    if 'text/html' in data: return _fence(_text(data['text/html']), '=html')
    if 'text/plain' in data: return _fence(_re_ansi.sub('', _text(data['text/plain'])), '.output')
    return ''

def nb_markdown(nb, title, save_media):
    "The processed notebook `nb` as one pandoc markdown document, starting with its YAML frontmatter"
    parts, front = [], None
    for c in nb['cells']:
        src = _text(c.get('source'))
        if c['cell_type'] == 'raw' and front is None and src.lstrip().startswith('---'): front = src.strip(); continue
        if c['cell_type'] != 'code':
            if src.strip(): parts.append(src)
            continue
        d, code = split_directives(src)
        if d.get('include') == 'false': continue
        if code and d.get('echo') != 'false': parts.append(_fence(code, '.python .cell-code'))
        if d.get('output') == 'false': continue
        parts += [m for m in (output_md(o, save_media) for o in c.get('outputs', [])) if m.strip()]
    if front is None: front = '---\n' + json.dumps({'title': title}) + '\n---'
    return front + '\n\n' + '\n\n'.join(parts) + '\n'

TEMPLATE = r'''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$pagetitle$ – $site-title$</title>
$if(description)$<meta name="description" content="$description$">$endif$
<style>
$highlighting-css$
</style>
<link rel="stylesheet" href="$root$styles.css">
</head>
<body>
<div class="fs-layout">
$sidebar$
<main class="fs-content" id="quarto-document-content">
<header id="title-block-header">
<h1 class="title">$title$</h1>
$if(description)$<p class="description">$description$</p>$endif$
</header>
$if(toc)$<nav id="TOC" class="fs-toc" role="doc-toc"><h2>On this page</h2>
$table-of-contents$
</nav>$endif$
$body$
</main>
</div>
</body>
</html>
'''

def sidebar_html(pages, current, site_title):
    "The sidebar `<nav>` for the page `current`, with links relative to it"
    root = '../' * current['html'].count('/')
    def li(p):
        here = ' class="active" aria-current="page"' if p is current else ''
        return f'<li><a href="{root}{p["html"]}"{here}>{html.escape(p["title"])}</a></li>'
    mods, tuts = [p for p in pages if not p['tutorial']], [p for p in pages if p['tutorial']]
    body = '<ul>' + ''.join(map(li, mods)) + '</ul>'
    if tuts: body += '<p class="fs-section">Tutorials</p><ul>' + ''.join(map(li, tuts)) + '</ul>'
    return (f'<nav class="sidebar fs-sidebar" id="fs-sidebar" aria-label="Pages">'
            f'<a class="fs-site-title" href="{root}index.html">{html.escape(site_title)}</a>{body}</nav>')

def render_pandoc(pages, proc, out):
    "Render each processed notebook in `proc` with pandoc into `out`, plus `styles.css` and the image assets"
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    site_url = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}".rstrip('/') + '/'
    out.mkdir(parents=True, exist_ok=True)
    tmpl = out.parent/'page.html5'
    tmpl.write_text(TEMPLATE)
    shutil.copy2(ROOT/'nbs'/'styles.css', out/'styles.css')
    for p in proc.rglob('*'):
        if p.is_file() and p.suffix.lower() in ASSETS:
            (out/p.relative_to(proc)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, out/p.relative_to(proc))
    for page in pages:
        stem, root = Path(page['html']).with_suffix('').as_posix(), '../' * page['html'].count('/')
        media, n = out/'media'/stem, [0]
        def save_media(data, suffix):
            n[0] += 1
            media.mkdir(parents=True, exist_ok=True)
            (media/f'output-{n[0]}{suffix}').write_bytes(data)
            return f'{root}media/{stem}/output-{n[0]}{suffix}'
        md = nb_markdown(json.loads((proc/page['src']).read_text(encoding='utf-8')), page['title'], save_media)
        dest = out/page['html']
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(['pandoc', '-f', 'markdown-smart', '-t', 'html5', '--standalone', f'--template={tmpl}', '--toc',
                        '--toc-depth=3', '--columns=10000', '--mathml', '--highlight-style=pygments', '-o', str(dest),
                        '-V', f'site-title={cfg.title}', '-V', f'root={root}', '-V',
                        f'sidebar={sidebar_html(pages, page, cfg.title)}'], input=md, text=True, check=True)
        if site_url.startswith('http'):  # links nbdev made to the hosted docs point into this site instead
            dest.write_text(dest.read_text(encoding='utf-8').replace(f'href="{site_url}', f'href="{root}'), encoding='utf-8')
    tmpl.unlink()

# --- quarto engine ---------------------------------------------------------------------------------------------------
def render_with_quarto(pages, proc, out, n_workers):
    "Render the processed pages with nbdev's Quarto renderer, as `nbdev-docs` does, with this build's sidebar"
    import yaml
    from nbdev.quarto_render import render_quarto
    from nbdev.quarto import _fix_quarto_nav
    for f in ('_quarto.yml', 'nbdev.yml', 'styles.css'): shutil.copy2(ROOT/'nbs'/f, proc/f)
    mods = [p['src'] for p in pages if not p['tutorial']]
    tuts = [p['src'] for p in pages if p['tutorial']]
    contents = mods + ([{'section': 'Tutorials', 'contents': tuts}] if tuts else [])
    (proc/'sidebar.yml').write_text(yaml.dump({'website': {'sidebar': {'contents': contents}}}, sort_keys=False))
    render_quarto(proc, out, n_workers=max(n_workers, 1))
    _fix_quarto_nav(out)

# --- main ------------------------------------------------------------------------------------------------------------
@call_parse
def main(
    dest:str=None,       # Folder to write the site into (default: `doc_path`, i.e. `_docs/`)
    engine:str='auto',   # `quarto`, `pandoc`, or `auto` (quarto when it is on PATH, else pandoc)
    n_workers:int=None,  # Notebooks executed at once (default: up to 4, one per CPU)
    file_re:str='',      # Only the notebooks whose file name matches this regex (a quick preview, never "current")
):
    "Build the docs site from the notebooks in `nbs/`: execute, process with nbdev, render with Quarto or pandoc"
    from nbdev.config import get_config
    if engine == 'auto': engine = 'quarto' if shutil.which('quarto') else 'pandoc'
    if engine not in ('quarto', 'pandoc'): raise SystemExit(f"`engine` must be one of ['auto', 'pandoc', 'quarto'], got {engine!r}")
    if not shutil.which(engine): raise SystemExit(f'`{engine}` is not installed (Debian: apt-get install {engine})')
    dest = Path(dest or get_config(ROOT).doc_path).resolve()
    n_workers = n_workers if n_workers is not None else min(4, os.cpu_count() or 1)
    pages, inputs = doc_pages(), build_hash()
    if file_re: pages = [p for p in pages if re.search(file_re, Path(p['src']).name)]
    if not pages: raise SystemExit('No notebook to build')  # hashed before the build, so an edit made during it makes it stale
    with tempfile.TemporaryDirectory(prefix='fastslim-docs-') as tmp:
        work = Path(tmp)
        proc = process_nbs(pages, work, n_workers)
        site = work/'site'
        if engine == 'quarto': render_with_quarto(pages, proc, site, n_workers)
        else: render_pandoc(pages, proc, site)
        (site/STAMP).write_text(json.dumps(dict(hash=inputs if not file_re else None, engine=engine, pages=pages), indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(site, dest)
    print(f'Built {len(pages)} pages with {engine} into {dest}')
