"Values written in more than one place (settings.ini, pyproject.toml, fastslim/__init__.py, the wheel) agree."
import configparser, re, shutil, subprocess, sys, tomllib, zipfile
from email.parser import Parser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def read_settings(root):
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(root/'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']

def init_version(root):
    m = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)[\'"]', (root/'fastslim'/'__init__.py').read_text(), re.M)
    return m and m.group(1)

def metadata_mismatches(root):
    "List of 'what: a != b' for every repeated metadata value that disagrees under `root`"
    s = read_settings(root)
    p = tomllib.loads((root/'pyproject.toml').read_text())
    proj, nbdev = p['project'], p['tool']['nbdev']
    pairs = [('name', s['lib_name'], proj['name']),
             ('description', s['description'], proj['description']),
             ('min_python', f">={s['min_python']}", proj['requires-python']),
             ('git_url', s['git_url'], proj['urls']['Repository']),
             ('doc_url', s['doc_url'], proj['urls']['Documentation']),
             ('version in fastslim/__init__.py', s['version'], init_version(root)),
             ('tst_flags', s['tst_flags'], nbdev['tst_flags'])]
    pairs += [(k, s[k], nbdev[k]) for k in ('lib_path', 'nbs_path', 'doc_path', 'branch', 'title')]
    return [f'{what}: {a!r} != {b!r}' for what, a, b in pairs if a != b]

def test_metadata_agrees():
    assert metadata_mismatches(ROOT) == []

def test_checker_catches_a_mismatch(tmp_path):
    "A deliberate disagreement in a copy of the project is reported"
    for f in ('settings.ini', 'pyproject.toml'): shutil.copy(ROOT/f, tmp_path/f)
    (tmp_path/'fastslim').mkdir()
    (tmp_path/'fastslim'/'__init__.py').write_text('__version__ = "9.9.9"\n')
    txt = (tmp_path/'pyproject.toml').read_text().replace('name = "fastslim"', 'name = "fastslimmer"')
    (tmp_path/'pyproject.toml').write_text(txt)
    found = '\n'.join(metadata_mismatches(tmp_path))
    assert 'name' in found and 'version' in found

def test_wheel(tmp_path):
    "`pip wheel .` builds a wheel whose metadata matches settings.ini, holds no notebook, and imports"
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(ROOT)],
                   check=True)
    whl, = tmp_path.glob('fastslim-*.whl')
    s = read_settings(ROOT)
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith('METADATA'))).decode())
        z.extractall(tmp_path/'site')
    assert not [n for n in names if n.endswith('.ipynb')]
    assert meta['Name'] == s['lib_name'] and meta['Version'] == s['version'] and meta['Summary'] == s['description']
    assert meta['Requires-Python'] == f">={s['min_python']}"
    urls = meta.get_all('Project-URL')
    assert f"Repository, {s['git_url']}" in urls and f"Documentation, {s['doc_url']}" in urls
    from packaging.requirements import Requirement
    core = {(r.name, str(r.specifier)) for r in map(Requirement, meta.get_all('Requires-Dist')) if not r.marker}
    assert core == {(r.name, str(r.specifier)) for r in map(Requirement, s['requirements'].split())}
    out = subprocess.run([sys.executable, '-c', 'import fastslim, sys; print(fastslim.__version__, fastslim.__file__)'],
                         cwd=tmp_path, env={'PYTHONPATH': str(tmp_path/'site'), 'PATH': '/usr/bin:/bin'},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == s['version'] and str(tmp_path/'site') in out

def quickstart_commands(text):
    "The shell commands in the Quickstart section's code blocks"
    qs = text.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
    return [b.strip() for b in re.findall(r'```bash\n(.*?)```', qs, re.S)]

def test_readme_quickstart():
    "Exactly two Quickstart commands; CI runs the second; the docs home page shows the same two"
    cmds = quickstart_commands((ROOT/'README.md').read_text())
    assert len(cmds) == 2 and all('\n' not in c for c in cmds)
    assert 'fastslim slim' in cmds[0] and 'pytest' in cmds[1]
    assert cmds[1] in (ROOT/'.ci'/'run').read_text().splitlines()
    import nbformat
    nb = nbformat.read(ROOT/'nbs'/'index.ipynb', as_version=4)
    md = '\n'.join(c.source for c in nb.cells if c.cell_type == 'markdown')
    assert quickstart_commands(md) == cmds

def test_readme_is_written_from_index():
    "README.md is the docs front page's text (nbs/index.ipynb), written by tools/readme.py: one text, no drift"
    sys.path.insert(0, str(ROOT/'tools'))
    try: from readme import readme_text
    finally: sys.path.pop(0)
    assert (ROOT/'README.md').read_text(encoding='utf-8') == readme_text(), "run `python tools/readme.py` after editing nbs/index.ipynb"
