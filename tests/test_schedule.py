"Property tests of fastslim.schedule: windows are honoured, pruning schedules only grow and end exactly at 1."
import numpy as np
import pytest
from hypothesis import given, settings, assume, strategies as st
from fastslim.schedule import *

fracs = st.floats(0, 1, allow_nan=False)
windows = st.tuples(fracs, fracs).filter(lambda t: t[1] - t[0] > 1e-3)
prune_kinds = st.sampled_from(['Iterative', 'AGP', 'OneShot'])
reg_kinds = st.sampled_from(['Constant', 'WarmUp', 'LinearDecay'])

def make_prune(kind, n, start, end):
    if kind == 'OneShot': return OneShot(start, end)
    return {'Iterative': Iterative, 'AGP': AGP}[kind](n, start, end)

def make_reg(kind, start, end):
    return WarmUp(0.3, start, end) if kind == 'WarmUp' else {'Constant': Constant, 'LinearDecay': LinearDecay}[kind](start, end)

@settings(max_examples=200, deadline=None)
@given(prune_kinds, st.integers(1, 30), windows, st.lists(fracs, min_size=2, max_size=30))
def test_prune_monotone_and_bounded(kind, n, win, ps):
    s = make_prune(kind, n, *win)
    ps = np.sort(np.array(ps))
    v = s(ps)
    assert np.all(np.diff(v) >= 0)
    assert np.all((v >= 0) & (v <= 1))

@settings(max_examples=200, deadline=None)
@given(prune_kinds, st.integers(1, 30), windows)
def test_prune_honours_window(kind, n, win):
    start, end = win
    s = make_prune(kind, n, start, end)
    assert s(np.nextafter(start, -1)) == 0. if start > 0 else True
    assert s(start) > 0                     # the first step is at start
    assert s(s.points[-1]) == 1.            # exactly 1 at the last step ...
    assert s.points[-1] < end               # ... which lies before end
    assert s(end) == 1. and s(1.) == 1.     # and stays there
    assert s.fractions[-1] == 1.
    if s.points[-1] > start: assert s(np.nextafter(s.points[-1], -1)) < 1.

@settings(max_examples=200, deadline=None)
@given(prune_kinds, st.integers(1, 20), windows, st.integers(1, 5000))
def test_steps_hit_once_before_end(kind, n, win, n_iters):
    s = make_prune(kind, n, *win)
    try: steps = s.steps(n_iters)
    except ValueError as e:
        assert '`n_iters`' in str(e)
        # refused only when the window really has fewer iterations than steps need
        assert (win[1] - win[0]) * n_iters < s.n + 1
        return
    assert len(steps) == s.n and steps == sorted(set(steps))
    assert all(0 <= i < n_iters for i in steps)
    assert steps[-1] / n_iters < win[1]
    # a callback walking the iterations sees exactly these changes, reaching exactly 1
    vals = [s.value_at(i, n_iters) for i in range(n_iters)]
    changes = [i for i in range(n_iters) if vals[i] != (vals[i-1] if i else 0.)]
    assert changes == steps
    assert vals[steps[-1]] == 1. and vals[-1] == 1.
    assert all(v == 0. for v in vals[:steps[0]])

@settings(max_examples=200, deadline=None)
@given(reg_kinds, windows, fracs)
def test_reg_zero_outside_window(kind, win, p):
    start, end = win
    s = make_reg(kind, start, end)
    v = s(p)
    assert 0 <= v <= 1
    if p < start or p >= end: assert v == 0.

@settings(max_examples=100, deadline=None)
@given(windows)
def test_reg_shapes(win):
    start, end = win
    mid = (start + end) / 2
    assert Constant(start, end)(mid) == 1.
    assert LinearDecay(start, end)(start) == 1.
    assert LinearDecay(start, end)(mid) == pytest.approx(0.5)
    assert WarmUp(0.5, start, end)(start) == 0.
    assert WarmUp(0.5, start, end)(mid) == pytest.approx(1.)

def test_agp_matches_zhu_gupta():
    "After step k of n, AGP is at s_f*(1-(1-k/n)^3) with s_f = 1"
    s = AGP(10, 0.1, 0.6)
    k = np.arange(1, 11)
    np.testing.assert_allclose(s(s.points), 1 - (1 - k/10)**3)
    assert np.all(np.diff(s.fractions) > 0) and np.all(np.diff(np.diff(s.fractions)) < 0)  # fast first, then slow

@pytest.mark.parametrize('start,end,param', [(-0.1, 1, 'start'), (0, 1.01, 'end'), (0.5, 0.5, 'start'), (0.7, 0.2, 'start'),
                                             (float('nan'), 1, 'start'), (0, None, 'end')])
@pytest.mark.parametrize('cls', [Constant, WarmUp, LinearDecay, OneShot, Iterative, AGP])
def test_bad_window(cls, start, end, param):
    with pytest.raises(ValueError, match=f'`{param}`'): cls(start=start, end=end)

def test_bad_n_and_iters():
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match='`n`'): Iterative(bad)
    with pytest.raises(ValueError, match='`n_iters`'): AGP(3).steps(0)
    with pytest.raises(ValueError, match='`warm`'): WarmUp(1.5)

def test_plot_returns_axes():
    import matplotlib
    matplotlib.use('Agg')
    ax = AGP(5, 0.1, 0.7).plot()
    x, y = ax.lines[0].get_data()
    assert len(x) > 100 and y.max() == 1. and y.min() == 0.
    ax = WarmUp(0.2).plot()
    assert ax.get_xlabel().startswith('fraction of training')
