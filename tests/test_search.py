"Width search (`fastslim.search`, issue #22): every trial meets the budget, a study resumes, the chosen plan meets the budget."
import importlib, re, sys, warnings
import pytest, torch
from fastai.learner import Learner
from fastslim.core import count_macs, example_batch
from fastslim.data import digits_dls
from fastslim.models import vgg_tiny, CifarResNet
from fastslim.plan import SlimPlan, plan_of
from fastslim.plan.select import select_per_group
from fastslim.criteria import l1_scores
from fastslim.search import search_widths, fit_widths, search_space, trial_macs, floor_macs, proxy_batches, WidthSearch

pytest.importorskip('optuna')

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64)

def trained(dls, model, epochs=1):
    torch.manual_seed(0)
    learn = Learner(dls, model)
    with warnings.catch_warnings(), learn.no_bar(), learn.no_logging():
        warnings.simplefilter('ignore'); learn.fit_one_cycle(epochs, 1e-2)
    return learn

@pytest.fixture(scope='module')
def vgg(dls): return trained(dls, vgg_tiny())

@pytest.fixture(scope='module')
def resnet(dls): return trained(dls, CifarResNet(depth=8, num_classes=10, in_channels=1, stem_width=8, stage_widths=[8, 16, 16]))

def state(model): return {k: v.clone() for k, v in model.state_dict().items()}

def exact_macs(learn, keep):
    "MACs of the compacted network with `keep` channels per group, measured on a fresh plan on a copy, as a share of dense"
    import copy
    m = copy.deepcopy(learn.model)
    plan = SlimPlan(m, example_batch(learn.dls), min_keep=0.1, verify=False)
    select_per_group(plan, l1_scores(plan), {n: 1 - k / plan[n].size for n, k in keep.items()}, min_keep=0.1)
    assert {g.name: g.n_keep for g in plan.groups} == keep
    x = plan.example[0][:1]
    return count_macs(plan.compact(), x) / count_macs(m, x)

@pytest.mark.parametrize('net,space,target,relative', [('vgg', 'stage', 0.3, True), ('resnet', 'stage', 0.2, True),
                                                       ('resnet', 'group', 0.1, True), ('resnet', 'stage', 0.1, False)])
def test_every_trial_meets_the_budget(request, net, space, target, relative):
    learn = request.getfixturevalue(net)
    ws = search_widths(learn, target, n_trials=6, space=space, relative=relative, kd_steps=1, calib_batches=2, score_batches=2, show_progress=False)
    ts = ws.trials
    assert len(ts) == 6 and ts[0]['global'] and not any(t['global'] for t in ts[1:])
    for t, tr in zip(ts, ws.study.trials):
        assert t['macs'] <= target                                   # measured on the compacted network of the trial
        assert exact_macs(learn, tr.user_attrs['keep']) <= target     # ... and again from its widths alone
    assert ws.best_trial.value >= ts[0]['value']                      # the global criterion's widths are trial 0

@pytest.mark.parametrize('space', ['stage', 'group'])
def test_relative_trial_0_is_the_global_widths(resnet, space):
    ws = search_widths(resnet, 0.2, n_trials=3, space=space, kd_steps=1, calib_batches=2, score_batches=2, show_progress=False)
    t0, g = ws.study.trials[0], ws.global_keep
    assert set(t0.params.values()) == {1.0}                           # every factor on the global widths is 1
    keep = t0.user_attrs['keep']
    assert all(keep[n] >= g[n] for n in g) and t0.user_attrs['macs'] <= 0.2   # the global widths, filled up to the budget at most
    assert sum(keep.values()) - sum(g.values()) <= 0.1 * sum(g.values())
    assert all(1 / 4 <= v <= 4 for t in ws.study.trials for v in t.params.values())

def test_starts_enqueue_more_global_widths(vgg):
    ws = search_widths(vgg, 0.3, n_trials=3, starts=['slimming'], calib_batches=2, score_batches=2, show_progress=False)
    ts = ws.trials
    assert ts[0]['global'] and ts[0]['start'] == 'l1' and ts[1]['start'] == 'slimming' and not ts[1]['global'] and ts[2]['start'] is None
    assert ws.best_trial.value >= max(ts[0]['value'], ts[1]['value'])
    with pytest.raises(ValueError, match='`starts` must name criteria that rank channels'): search_widths(vgg, 0.3, starts=['magnitude'])

def test_fit_widths_is_feasible_and_never_empties_a_group(resnet):
    plan = SlimPlan(CifarResNet(depth=8, num_classes=10, in_channels=1, stem_width=8, stage_widths=[8, 16, 16]), example_batch(resnet.dls))
    dims = search_space(plan, 'group')
    gen = torch.Generator().manual_seed(0)
    for target in (0.05, 0.1, 0.3, 0.7):
        for _ in range(5):
            fr = {d: float(torch.rand(1, generator=gen)) * 0.95 + 0.05 for d in dims}
            keep = fit_widths(plan, fr, target, dims, min_keep=0.1)
            assert trial_macs(plan, keep) <= target and all(k >= 1 for k in keep.values())
    assert floor_macs(plan, 0.1) < 0.05
    with pytest.raises(ValueError, match='`target_macs`=0.01 is out of reach'): fit_widths(plan, {d: 1. for d in dims}, 0.01, dims, min_keep=0.5)

def test_resume(vgg, tmp_path):
    kw = dict(kd_steps=1, calib_batches=2, score_batches=2, show_progress=False, path=tmp_path/'run')
    a = search_widths(vgg, 0.3, n_trials=3, **kw)
    assert (tmp_path/'run'/'search.db').exists() and (tmp_path/'run'/'search.png').exists()
    first = [(t.params, t.value) for t in a.study.trials]
    b = search_widths(vgg, 0.3, n_trials=5, **kw)                     # two more trials on top of the stored three
    assert len(b.trials) == 5 and [(t.params, t.value) for t in b.study.trials[:3]] == first
    c = search_widths(vgg, 0.3, n_trials=5, **kw)                     # done already: nothing new runs
    assert len(c.study.trials) == 5 and c.keep == b.keep
    with pytest.raises(ValueError, match='`path`: the study .*target_macs differ'): search_widths(vgg, 0.25, n_trials=5, **kw)

def test_plan_meets_the_budget_and_the_model_is_untouched_until_apply(dls):
    learn = trained(dls, vgg_tiny())
    before = state(learn.model)
    ws = search_widths(learn, 0.25, n_trials=4, calib_batches=2, score_batches=2, show_progress=False)
    after = learn.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)   # no weight, no mask buffer
    assert plan_of(learn.model) is None
    x = example_batch(dls)[0][:1]
    dense = count_macs(learn.model, x)
    assert isinstance(ws, WidthSearch) and isinstance(ws.plan, SlimPlan)
    assert count_macs(ws.plan.compact(), x) / dense <= 0.25
    plan = ws.apply(learn)
    assert plan.model is learn.model and {g.name: g.n_keep for g in plan.groups} == ws.keep
    assert count_macs(plan.compact(), x) / dense <= 0.25
    w = plan.groups[0].root.weight
    assert (w[~plan.groups[0].keep] == 0).all()                      # the masked filters are zeroed on the learner's model
    assert set(ws.ratios) == set(ws.keep) and all(0 <= r < 1 for r in ws.ratios.values())

def test_bad_input_is_refused_before_anything(vgg, tmp_path):
    before = state(vgg.model)
    bad = [(dict(target_macs=1.5), '`target_macs` must be a fraction in (0, 1)'), (dict(target_macs=0), '`target_macs`'),
           (dict(n_trials=0), '`n_trials` must be a whole number >= 1'), (dict(space='layer'), '`space` must be one of'),
           (dict(kd_steps=-1), '`kd_steps`'), (dict(calib_batches=0), '`calib_batches`'), (dict(metric='f1'), '`metric` must be one of'),
           (dict(min_keep=1.5), '`min_keep`'), (dict(round_to=0), '`round_to`'), (dict(lr=-1), '`lr`'), (dict(alpha=2), '`alpha`'),
           (dict(criterion='nope'), 'unknown `criterion`'), (dict(criterion='magnitude'), '`criterion` must rank channels'),
           (dict(calib_batches=500), '`calib_batches` + `score_batches`'), (dict(path=3), '`path`'),
           (dict(target_macs=0.001, min_keep=0.5), '`target_macs`=0.001 is out of reach')]
    for kw, msg in bad:
        kw = dict(dict(target_macs=0.3, n_trials=2, show_progress=False, path=tmp_path/'bad'), **kw)
        with pytest.raises(ValueError, match=re.escape(msg)): search_widths(vgg, **kw)
    with pytest.raises(ValueError, match='`learn` must be a fastai Learner'): search_widths(vgg.model, 0.3)
    assert all(torch.equal(before[k], v) for k, v in vgg.model.state_dict().items())
    assert not (tmp_path/'bad').exists()

def test_proxy_batches_are_disjoint():
    from fastslim.data import tensor_dls
    n = 400
    d = tensor_dls(torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 2, 2), torch.arange(n) % 10, valid_pct=0.1, bs=32)
    fit, score = proxy_batches(d, 3, 2)
    assert len(fit) == 3 and len(score) == 2 and len(fit[0][0]) == 1
    ids = lambda bs: {int(v) for b in bs for v in b[0][0][:, 0, 0, 0]}
    assert len(ids(fit)) == 96 and len(ids(score)) == 64 and not ids(fit) & ids(score)
    with pytest.raises(ValueError, match='`calib_batches` \\+ `score_batches` = 20'): proxy_batches(d, 10, 10)

def test_plot(vgg, tmp_path):
    import matplotlib; matplotlib.use('Agg')
    ws = search_widths(vgg, 0.3, n_trials=3, calib_batches=2, score_batches=2, show_progress=False)
    fig = ws.plot(tmp_path/'s.png')
    assert (tmp_path/'s.png').stat().st_size > 1000 and len(fig.axes) == 2

def test_imports_without_optuna(monkeypatch, vgg):
    import fastslim.search as s
    monkeypatch.setitem(sys.modules, 'optuna', None)                  # `import optuna` raises ImportError
    s = importlib.reload(s)
    with pytest.raises(ImportError, match=r'pip install "fastslim\[search\]"'): s.search_widths(vgg, 0.3, n_trials=2)
    monkeypatch.undo(); importlib.reload(s)
