"Every notebook in nbs/ runs through nbdev's own runner, so `pytest` alone tests the docs' examples too."
import os, subprocess, sys
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_nb

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT/'nbs').glob('**/*.ipynb') if '.ipynb_checkpoints' not in p.parts)

def skip_flags():
    "Flags in `tst_flags` skip their cells unless named in FASTSLIM_TEST_FLAGS"
    forced = set(os.environ.get('FASTSLIM_TEST_FLAGS', '').split())
    return [f for f in str(get_config(ROOT).tst_flags).split() if f not in forced]

RUN = """import sys, torch
torch.set_num_threads(1)
from nbdev.test import test_nb
ok, _ = test_nb(sys.argv[1], skip_flags=sys.argv[2].split())
sys.exit(0 if ok else 1)
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
