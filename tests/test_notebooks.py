"Every notebook in nbs/ runs through nbdev's own runner, so `pytest` alone tests the docs' examples too."
import os
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

@pytest.mark.parametrize('nb', NBS, ids=[str(p.relative_to(ROOT/'nbs').with_suffix('')) for p in NBS])
def test_notebook(nb):
    ok, _ = run_nb(nb, skip_flags=skip_flags())
    assert ok, f'{nb.name} failed (its traceback is above)'

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
