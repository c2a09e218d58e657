"""Every notebook in nbs/ runs through nbdev's own runner, so `pytest` alone tests the docs' examples too.

Each notebook runs as the docs site shows it (tools/build_docs.py's `run_nb`: a hidden copy beside it, show_doc tables
added); a green run is kept under `.nbruns/`, keyed by every input of the site, the skipped flags and the installed
versions, and the site build (tests/test_docs_site.py, run after these) processes that run instead of executing the
notebook a second time."""
import os, subprocess, sys
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_nb

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT/'nbs').glob('**/*.ipynb') if not any(o.startswith('.') for o in p.relative_to(ROOT/'nbs').parts))

def skip_flags():
    "Flags in `tst_flags` skip their cells unless named in FASTSLIM_TEST_FLAGS"
    forced = set(os.environ.get('FASTSLIM_TEST_FLAGS', '').split())
    return [f for f in str(get_config(ROOT).tst_flags).split() if f not in forced]

RUN = f"""import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {str(ROOT/'tools')!r})
from build_docs import run_nb
sys.exit(0 if run_nb(sys.argv[1], sys.argv[2].split()) else 1)
"""

@pytest.mark.parametrize('nb', NBS, ids=[str(p.relative_to(ROOT/'nbs').with_suffix('')) for p in NBS])
def test_notebook(nb):
    "Each notebook runs in a fresh process: notebooks patch `Learner` and register timm models, which must not leak"
    r = subprocess.run([sys.executable, '-c', RUN, str(nb), ' '.join(skip_flags())], capture_output=True, text=True)
    assert r.returncode == 0, f'{nb.name} failed:\n{r.stderr[-6000:]}'

def test_failing_notebook_is_reported(tmp_path):
    "The runner really fails on a broken cell, so a green notebook test means something"
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('assert 1 == 2')])
    fn = tmp_path/'broken.ipynb'
    nbformat.write(nb, fn)
    ok, _ = run_nb(fn, showerr=False)
    assert not ok

def test_slow_flag_is_skipped(tmp_path):
    "A cell flagged `#| slow` is skipped by default, and runs when the flag is forced"
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('#| slow\nraise RuntimeError("ran")')])
    fn = tmp_path/'slow.ipynb'
    nbformat.write(nb, fn)
    assert run_nb(fn, skip_flags=['slow'], showerr=False)[0]
    assert not run_nb(fn, skip_flags=[], showerr=False)[0]

def test_site_build_reuses_a_kept_run(tmp_path, monkeypatch):
    "The build processes the run the tests kept instead of executing the notebook again, and a new input makes a new key"
    import nbformat, uuid
    sys.path.insert(0, str(ROOT/'tools'))
    import build_docs
    monkeypatch.chdir(tmp_path)
    rel, flags = f'_probe_{uuid.uuid4().hex}.ipynb', ['slow']
    key = build_docs.run_key(rel, flags)
    assert key != build_docs.run_key(rel, []) and key != build_docs.run_key(rel, flags, inputs='other inputs')
    src, dst = tmp_path/'nbs'/rel, tmp_path/'proc'/rel
    src.parent.mkdir()
    def scratch(): nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('raise RuntimeError("ran again")')]), src)
    kept = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('print(1)', outputs=[nbformat.v4.new_output(
        'stream', name='stdout', text='the kept run')])])
    try:
        nbformat.write(kept, tmp_path/'kept.ipynb')
        build_docs.RUNS.mkdir(exist_ok=True)
        build_docs.keep_run(tmp_path/'kept.ipynb', key)
        scratch()
        assert build_docs._exec_and_proc((src, dst, rel), flags, build_docs.build_hash()) is None
        assert 'the kept run' in dst.read_text()
        (build_docs.RUNS/key).unlink()
        scratch()
        assert 'a cell failed' in build_docs._exec_and_proc((src, dst, rel), flags, build_docs.build_hash())
    finally:
        for f in build_docs.RUNS.glob(f'{Path(rel).stem}*'): f.unlink()
