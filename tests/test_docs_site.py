"""The docs site builds offline (tools/build_docs.py) and headless Chromium, served over HTTP, shows what it must:
a sidebar listing every page, show_doc signatures with their parameter tables, and plots that load."""
import fcntl, html, importlib, json, os, re, shutil, struct, subprocess, sys, tempfile, threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
sys.path.insert(0, str(ROOT/'tools'))
import build_docs
pytestmark = pytest.mark.xdist_group('docs_site')   # one worker builds and checks the site, last (`--no-loadscope-reorder` keeps conftest's order), from the notebook runs the tests kept

# The page and callable whose signature and parameter table must render: (page, module, name).
API = ('prune.html', 'fastslim.prune', 'PruneCallback')
PLOT_NB = NBS/'20_sparsity.ipynb'  # has plots (plot_bn_scales): once it exists, the site must show an image
BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')

def _require(what, found):
    "`found`, or skip when `what` is missing outside CI; in CI (`CI=true`, where .ci/run installs it) fail"
    if found: return found
    msg = f'{what} is not installed (Debian: apt-get install -y pandoc chromium; .ci/run installs both)'
    if os.environ.get('CI', '').lower() == 'true': pytest.fail(msg)
    pytest.skip(msg)

@pytest.fixture(scope='module')
def browser():
    return _require('Chromium', os.environ.get('CHROME') or next(filter(None, map(shutil.which, BROWSERS)), None))

@pytest.fixture(scope='module')
def site():
    "`_docs/`, rebuilt with pandoc unless it already holds a pandoc build of the current sources (as after .ci/run)"
    _require('pandoc', shutil.which('pandoc'))
    docs = ROOT/'_docs'
    run = os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid()))  # one pytest run
    lock = Path(tempfile.gettempdir())/f'fastslim-docs-{build_docs.build_hash()[:12]}-{run}.lock'
    with open(lock, 'a+') as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)  # xdist workers wait for one build instead of each running their own
        lk.seek(0)
        if (failed := lk.read()): pytest.fail(f'the docs build failed (in another worker):\n{failed}')
        if not build_docs.is_current(docs, engine='pandoc'):
            res = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--engine', 'pandoc', '--dest', str(docs)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=1500)
            if res.returncode:
                lk.write(msg := f'{res.stdout[-3000:]}\n{res.stderr[-6000:]}'); lk.flush()
                pytest.fail(f'the docs build failed:\n{msg}')
    return docs

# What a browser reports about each page: run inside /__check__.html, which loads every page in an iframe
CHECK_JS = r'''
const rows = t => [...t.querySelectorAll('tbody tr')].map(r => [...r.cells].map(c => c.textContent.trim()));
const table = t => ({head: [...t.querySelectorAll('thead th')].map(x => x.textContent.trim()), rows: rows(t)});
function sections(d) {
  return [...d.querySelectorAll('h3[id]')].map(h => {
    const s = {id: h.id, pres: [], tables: []};
    for (let e = h.nextElementSibling; e && !/^(H1|H2|H3|HR)$/.test(e.tagName); e = e.nextElementSibling) {
      if (e.tagName === 'PRE') s.pres.push(e.textContent);
      e.querySelectorAll('pre').forEach(p => s.pres.push(p.textContent));
      (e.tagName === 'TABLE' ? [e] : [...e.querySelectorAll('table')]).forEach(t => s.tables.push(table(t)));
    }
    return s;
  });
}
window.addEventListener('load', () => {
  const out = {};
  for (const f of document.querySelectorAll('iframe')) {
    const d = f.contentDocument, page = f.dataset.page;
    out[page] = {
      h1: d.querySelector('h1') ? d.querySelector('h1').textContent.trim() : null,
      sidebar: [...d.querySelectorAll('nav.sidebar li a')].map(a => ({path: new URL(a.href).pathname.slice(1),
                                                                    text: a.textContent.trim()})),
      sections: sections(d),
      imgs: [...d.images].map(i => ({src: i.getAttribute('src'), id: i.id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
    };
  }
  document.getElementById('result').textContent = JSON.stringify(out);
});
'''

def check_page(pages):
    frames = ''.join(f'<iframe data-page="{p}" src="/{p}" width="1280" height="900"></iframe>' for p in pages)
    return f'<!DOCTYPE html><html><body><pre id="result">pending</pre>{frames}<script>{CHECK_JS}</script></body></html>'

class _Handler(SimpleHTTPRequestHandler):
    extra = {}
    def log_message(self, *args): pass
    def do_GET(self):
        body = self.extra.get(self.path)
        if body is None: return super().do_GET()
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

@pytest.fixture(scope='module')
def server(site):
    "(URL, extra pages) of the site served on 127.0.0.1 (a free port), plus /__check__.html and `extra` pages"
    pages = [p['html'] for p in json.loads((site/build_docs.STAMP).read_text())['pages']]
    extra = {'/__check__.html': check_page(pages).encode()}
    handler = type('Handler', (_Handler,), {'extra': extra})
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(handler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', extra
    httpd.shutdown(); httpd.server_close()

def chromium(browser, *args):
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                              '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-quic',
                              f'--user-data-dir={profile}', *args], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout

@pytest.fixture(scope='module')
def dom(browser, server):
    "{page: what Chromium rendered}, from one `--dump-dom` of the check page"
    out = chromium(browser, '--virtual-time-budget=20000', '--dump-dom', f'{server[0]}/__check__.html')
    m = re.search(r'<pre id="result">(.*?)</pre>', out, re.S)
    assert m and m[1] != 'pending', f'the check page did not report:\n{out[:2000]}'
    return json.loads(html.unescape(m[1]))

def expected_pages():
    "(page, title) for every notebook, as nbdev names the pages: index, the modules in order, then tutorials"
    from nbdev.config import nbpath2html
    def title(p): return next(l[2:].strip() for c in json.loads(p.read_text())['cells'] if c['cell_type'] == 'markdown'
                              for l in ''.join(c['source']).splitlines() if l.startswith('# '))
    mods = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.', 'index')))
    tuts = sorted(p for p in (NBS/'tutorials').glob('*.ipynb') if not p.name.startswith(('_', '.')))
    return [(nbpath2html(p.relative_to(NBS)).as_posix(), title(p)) for p in [NBS/'index.ipynb', *mods, *tuts]]

def test_sidebar_lists_every_notebook(dom):
    want = expected_pages()
    assert len(want) >= 5 and want[0][0] == 'index.html' and ('core.html', 'Core') in want
    for page, title in want:  # every page, the home page first: same sidebar, own title
        assert [(a['path'], a['text']) for a in dom[page]['sidebar']] == want, f'sidebar of {page}'
        assert dom[page]['h1'] == title, f'{page} did not render its title'

def test_api_page_shows_signature_and_parameter_table(dom):
    from fastcore.docments import docments
    page, mod, name = API
    dm = {k: v for k, v in docments(getattr(importlib.import_module(mod), name)).items() if k not in ('self', 'return')}
    assert any(dm.values()), f'{name} has no documented parameter (docments comments) to show in a table'
    sec = next((s for s in dom[page]['sections'] if s['id'].lower() == name.lower()), None)
    assert sec, f'{page} has no show_doc section for {name}'
    sig = next((p for p in sec['pres'] if f'{name}(' in p), '')
    assert sig and all(p in sig for p in dm), f'signature of {name} missing or incomplete: {sec["pres"]}'
    tbl = next((t for t in sec['tables'] if t['head'][1:] == ['Type', 'Default', 'Details'][-len(t['head'][1:]):]), None)
    assert tbl, f'no parameter table under {name}: {sec["tables"]}'
    assert [r[0] for r in tbl['rows'] if r[0] != 'Returns'] == list(dm), tbl['rows']
    def norm(s): return ' '.join(re.sub(r'[`*]', '', s).split())  # the rendered text of a markdown docment
    for r in tbl['rows']:
        if dm.get(r[0]): assert norm(r[-1]) == norm(dm[r[0]]), f'details of `{r[0]}`: {r[-1]!r} != {dm[r[0]]!r}'

def test_plots_load(dom):
    imgs = {(page, i['src']): i for page, d in dom.items() for i in d['imgs']}
    if PLOT_NB.exists(): assert imgs, 'no page of the site shows an image, though nbs/20_sparsity.ipynb draws plots'
    bad = [k for k, i in imgs.items() if not (i['complete'] and i['w'] > 0 and i['h'] > 0)]
    assert not bad, f'images that did not load: {bad}'

def _png_size(p):
    b = Path(p).read_bytes()
    assert b[:8] == b'\x89PNG\r\n\x1a\n', f'{p} is not a PNG'
    return struct.unpack('>II', b[16:24])

def shot_page(page, anchor):
    "A 1280x1600 frame showing `page` scrolled to the element `anchor` (headless Chromium paints a #fragment blank)"
    return (f'<!DOCTYPE html><html><body style="margin:0"><iframe id="f" src="/{page}" style="width:1280px;height:1600px;'
            f'border:0;display:block"></iframe><script>f.onload = () => {{ const w = f.contentWindow, '
            f'e = f.contentDocument.getElementById({json.dumps(anchor)}); '
            f'if (e) w.scrollTo(0, e.getBoundingClientRect().top + w.scrollY - 120); }};</script></body></html>')

def test_screenshot(browser, server, dom, tmp_path):
    "Screenshots of the API page's show_doc and of a plot (sparsity's if it has one), kept as `_docs/screenshot*.png`"
    url, extra = server
    plots = sorted((p != 'sparsity.html', p, i['id']) for p, d in dom.items() for i in d['imgs'])
    api = next(s['id'] for s in dom[API[0]]['sections'] if s['id'].lower() == API[2].lower())
    shots = {'screenshot.png': (API[0], api), **({'screenshot-plot.png': plots[0][1:]} if plots else {})}
    (ROOT/'_docs').mkdir(exist_ok=True)
    for fname, (page, anchor) in shots.items():
        png = tmp_path/fname
        extra['/__shot__.html'] = shot_page(page, anchor).encode()
        chromium(browser, '--hide-scrollbars', f'--screenshot={png}', '--window-size=1280,1600', f'{url}/__shot__.html')
        assert _png_size(png) == (1280, 1600) and png.stat().st_size > 30_000, f'blank or missing screenshot of {page}'
        shutil.copy2(png, ROOT/'_docs'/fname)
