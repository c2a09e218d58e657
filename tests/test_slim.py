"The slim pipeline end to end on scikit-learn's digits: accuracy and MACs that land, every method, resume, bad input."
import copy, warnings
import pytest, torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastslim.data import digits_dls
from fastslim.models import vgg_tiny, ResNet
from fastslim.slim import METHODS, accuracy_of
import fastslim.slim  # patches Learner.slim

CFG = [32, 'M', 64, 'M', 128]

def _dense(seed=0, epochs=4, cfg=CFG, model=None):
    "A vgg_tiny (or `model`) trained on digits for `epochs`"
    set_seed(seed)
    learn = Learner(digits_dls(), model or vgg_tiny(cfg=cfg), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 1e-2)
    return learn

def _slim(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): return learn.slim(*args, measure_speed=False, **kwargs)

def _state(m): return {k: v.clone() for k, v in m.state_dict().items()}
def _same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

# Measured (seeds 0, 1, 2): slim accuracy 0.992-0.994, effective MACs 0.2483-0.2497, BN-stats-only 0.91-0.94.
def test_pipeline_end_to_end():
    learn = _dense(0)
    r = _slim(learn, 'slimming', target_macs=0.25, sparse_epochs=3, prune_epochs=1, finetune_epochs=3)
    eff = r.slim['macs'] / r.dense['macs']
    assert abs(eff - 0.25) <= 0.02 * 0.25 + 1e-9, eff           # within 2% of the target
    assert r.slim['accuracy'] > 0.95, r.slim['accuracy']
    assert r.slim['accuracy'] == pytest.approx(accuracy_of(learn))  # the report describes learn.model
    stages = {s['stage']: s for s in r.stages}
    assert list(stages) == ['dense', 'sparse', 'pruned (BN stats only)', 'prune', 'finetune']
    assert stages['pruned (BN stats only)']['accuracy'] > 0.5    # chance is 0.1
    assert r.slim['params'] < r.dense['params']

def _method_learn(method):
    if method == 'sss':  # needs residual blocks: a small CIFAR-style ResNet on 8x8 digits
        return _dense(0, 1, model=ResNet(depth=14, in_channels=1, stem_width=8, stage_widths=[8, 16, 32]))
    return _dense(0, 1, cfg=[16, 'M', 32, 'M', 64])

def _epochs(method): return dict(sparse_epochs=1 if METHODS[method].sparsity else 0, prune_epochs=1, finetune_epochs=1)

@pytest.mark.parametrize('method', ['l1', 'magnitude', 'sss'])
def test_methods_by_ratio(method):
    learn = _method_learn(method)
    r = _slim(learn, method, ratio=0.5, **_epochs(method))
    if method == 'magnitude':   # unstructured: same MACs and shape, half the weights zero
        assert r.slim['macs'] == r.dense['macs']
        ws = [m.weight for m in learn.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        zero = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        assert zero >= 0.45, zero   # the masks must hold through fine-tuning
    else: assert r.slim['macs'] < 0.9 * r.dense['macs'], (r.slim['macs'], r.dense['macs'])
    assert r.slim['accuracy'] > 0.5

@pytest.mark.parametrize('method', sorted(set(METHODS) - {'magnitude', 'sss'}))
def test_every_channel_method_by_target_macs(method):
    "Every method but 'magnitude' and 'sss' (which take `ratio`, tested above) at half the MACs"
    learn = _method_learn(method)
    r = _slim(learn, method, target_macs=0.5, **_epochs(method))
    assert abs(r.slim['macs'] / r.dense['macs'] - 0.5) < 0.05
    assert r.slim['accuracy'] > 0.5

SETTINGS = dict(target_macs=0.3, sparse_epochs=1, prune_epochs=1, finetune_epochs=1)

def _count_fits(monkeypatch, fail_at=None):
    "Count `Learner.fit_one_cycle` calls; raise at call number `fail_at` to simulate an interruption"
    calls, orig = [], Learner.fit_one_cycle
    def fit(self, *args, **kwargs):
        calls.append(args[0])
        if fail_at is not None and len(calls) == fail_at: raise KeyboardInterrupt('simulated')
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(Learner, 'fit_one_cycle', fit)
    return calls

def test_resume_after_interruption(tmp_path, monkeypatch):
    base = _dense(0, 2, cfg=[16, 'M', 32, 'M', 64])
    dense_sd = _state(base.model)
    ref = _slim(copy.deepcopy(base), 'slimming', **SETTINGS)          # uninterrupted, in memory
    calls = _count_fits(monkeypatch, fail_at=3)                       # dies in fine-tuning (3rd fit)
    learn = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt): _slim(learn, 'slimming', path=tmp_path, **SETTINGS)
    assert (tmp_path/'sparse.pt').exists() and (tmp_path/'prune.pt').exists() and not (tmp_path/'finetune.pt').exists()
    monkeypatch.undo()
    learn = _dense(0, 0, cfg=[16, 'M', 32, 'M', 64]); learn.model.load_state_dict(dense_sd)
    calls = _count_fits(monkeypatch)
    r = _slim(learn, 'slimming', path=tmp_path, resume=True, **SETTINGS)
    assert calls == [1], calls                                        # only fine-tuning ran again
    assert [s['stage'] for s in r.stages] == [s['stage'] for s in ref.stages]
    assert r.slim['macs'] == ref.slim['macs']                         # the same masks were restored
    assert r.slim['accuracy'] > 0.5
    assert r.slim['accuracy'] == pytest.approx(accuracy_of(learn))

def test_resume_finished_run(tmp_path, monkeypatch):
    base = _dense(0, 2, cfg=[16, 'M', 32, 'M', 64])
    first = _slim(copy.deepcopy(base), 'slimming', path=tmp_path, **SETTINGS)
    calls = _count_fits(monkeypatch)
    learn = copy.deepcopy(base)
    r = _slim(learn, 'slimming', path=tmp_path, resume=True, **SETTINGS)
    assert calls == []                                               # nothing is trained again
    assert r.slim['macs'] == first.slim['macs']
    assert r.slim['accuracy'] == pytest.approx(first.slim['accuracy'])

@pytest.mark.parametrize('change', [dict(target_macs=0.5), dict(min_keep=0.2), dict(T=2.), dict(n_steps=2), dict(lr=2e-2),
                                    dict(sparsity_kw=dict(settle=0.25))])
def test_resume_with_other_settings(tmp_path, change):
    "Any option that changes what is trained stops a resume: the budget, `min_keep`, a distillation or pruning option, `lr`"
    base = _dense(0, 1, cfg=[16, 'M', 32, 'M', 64])
    _slim(copy.deepcopy(base), 'slimming', path=tmp_path, **SETTINGS)
    learn = copy.deepcopy(base); sd = _state(learn.model)
    with pytest.raises(ValueError, match='other settings'):
        _slim(learn, 'slimming', path=tmp_path, resume=True, **{**SETTINGS, **change})
    assert _same(sd, _state(learn.model))

@pytest.mark.filterwarnings('ignore:learn.slim. sparsity training cost:UserWarning')
def test_sparsity_kw_reaches_the_stage(monkeypatch):
    "`sparsity_kw` configures the stage-1 callback the run trains with, and the removed channels end at exact zeros"
    from fastslim.sparsity import SparsityCallback
    seen, after_fit = [], SparsityCallback.after_fit
    def spy(self): seen.append((self.settle, self.every, int((self.targeted() == 0).sum()), self.targeted().numel())); after_fit(self)
    monkeypatch.setattr(SparsityCallback, 'after_fit', spy)
    _slim(_dense(0, 1, cfg=[16, 'M', 32, 'M', 64]), 'slimming', target_macs=0.5, sparse_epochs=1, prune_epochs=0, finetune_epochs=0,
          sparsity_kw=dict(settle=0.3, every=5))
    (settle, every, zeros, n), = seen
    assert (settle, every) == (0.3, 5) and n > 0 and zeros == n

def test_resume_ignores_what_only_reports(tmp_path, monkeypatch):
    "`strict`, `tolerance` and `measure_speed` change what is reported or whether to stop, not what is trained: a resume accepts them"
    base = _dense(0, 1, cfg=[16, 'M', 32, 'M', 64])
    first = _slim(copy.deepcopy(base), 'slimming', path=tmp_path, **SETTINGS)
    calls = _count_fits(monkeypatch)
    r = _slim(copy.deepcopy(base), 'slimming', path=tmp_path, resume=True, strict=True, tolerance=0.5, **SETTINGS)
    assert calls == [] and r.slim['macs'] == first.slim['macs']

NEXT = dict(sparse='prune', prune='finetune')

@pytest.mark.filterwarnings('ignore:learn.slim. sparsity training cost:UserWarning')   # one epoch of a tiny net, steered hard
@pytest.mark.parametrize('stage', ['sparse', 'prune'])
@pytest.mark.parametrize('method', sorted(METHODS))
def test_resume_every_method(method, stage, tmp_path, monkeypatch):
    "Interrupted right after `stage`, every method resumes from that stage's checkpoint, trains only what is left, and finishes slim"
    import fastslim.slim as S
    from fastslim.plan import plan_of
    base, kw = _method_learn(method), dict(ratio=0.5, **_epochs(method))
    def die(self): raise KeyboardInterrupt('simulated')
    monkeypatch.setattr(S.SlimRun, NEXT[stage], die)
    with pytest.raises(KeyboardInterrupt): _slim(copy.deepcopy(base), method, path=tmp_path, **kw)
    saved = torch.load(tmp_path/f'{stage}.pt', map_location='cpu', weights_only=True)['state_dict']
    monkeypatch.undo()
    seen, orig = [], getattr(S.SlimRun, NEXT[stage])
    def spy(self): seen.append((_state(self.learn.model), plan_of(self.learn.model))); return orig(self)
    monkeypatch.setattr(S.SlimRun, NEXT[stage], spy)
    calls = _count_fits(monkeypatch)
    learn = copy.deepcopy(base)
    r = _slim(learn, method, path=tmp_path, resume=True, **kw)
    (state, plan), = seen
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)   # the checkpoint, not the dense net
    assert (plan is not None) == (stage == 'prune' and method != 'sss' or method == 'group_lasso')  # masks (group lasso's plan) come back
    assert calls == [1] * (2 if stage == 'sparse' and kw['prune_epochs'] else 1), calls             # only what was left trains
    assert [s['stage'] for s in r.stages][0] == 'dense' and r.stages[-1]['stage'] == 'finetune'
    assert r.slim['accuracy'] == pytest.approx(accuracy_of(learn)) and r.slim['accuracy'] > 0.3
    if method == 'magnitude': assert r.slim['macs'] == r.dense['macs'] and r.slim['sparsity'] > 0.4
    else: assert r.slim['macs'] < 0.9 * r.dense['macs'], (r.slim['macs'], r.dense['macs'])

@pytest.mark.parametrize('kwargs, match', [
    (dict(method='nope', target_macs=0.5), 'method'),
    (dict(method='slimming'), 'ratio'),
    (dict(method='slimming', ratio=0.5, target_macs=0.5), 'ratio'),
    (dict(method='slimming', target_macs=0.), 'target_macs'),
    (dict(method='slimming', target_macs=1.), 'target_macs'),
    (dict(method='slimming', target_macs=-0.2), 'target_macs'),
    (dict(method='slimming', ratio=1.), 'ratio'),
    (dict(method='magnitude', target_macs=0.5), 'ratio'),
    (dict(method='sss', target_macs=0.5), 'ratio'),
    (dict(method='slimming', target_macs=0.5, sparse_epochs=-1), 'sparse_epochs'),
    (dict(method='slimming', target_macs=0.5, prune_epochs=-1), 'prune_epochs'),
    (dict(method='slimming', target_macs=0.5, finetune_epochs=1.5), 'finetune_epochs'),
    (dict(method='slimming', target_macs=0.5, resume=True), 'path'),
    (dict(method='l1', target_macs=0.5, T=0), '`T`'),
    (dict(method='l1', ratio=0.5, scope='locall'), '`scope`'),
    (dict(method='slimming', target_macs=0.5, lr=-1), '`lr`'),
    (dict(method='slimming', target_macs=0.5, lr=0), '`lr`'),
    (dict(method='slimming', target_macs=0.5, lr=float('nan')), '`lr`'),
    (dict(method='slimming', target_macs=0.5, distill='no'), '`distill`'),
    (dict(method='slimming', target_macs=0.5, alpha=2), '`alpha`'),
    (dict(method='slimming', target_macs=0.5, reg=-1), '`reg`'),
    (dict(method='l1', target_macs=0.5, min_keep=-1), '`min_keep`'),
    (dict(method='l1', target_macs=0.5, distill=False, T=2), 'distill'),
    (dict(method='slimming', target_macs=0.5, tolerance=1.5), '`tolerance`'),
    # a latency budget (issue #19): one budget, a channel method, `LatencyModel` options in range
    (dict(method='l1'), 'exactly one of `ratio`, `target_macs` and `target_latency`'),
    (dict(method='l1', ratio=0.5, target_latency=0.5), 'exactly one'),
    (dict(method='slimming', target_macs=0.5, target_latency=0.5), 'exactly one'),
    (dict(method='magnitude', target_latency=0.5), '`target_latency`'),
    (dict(method='sss', target_latency=0.5), '`target_latency`'),
    (dict(method='l1', target_latency=1.), '`target_latency` must be'),
    (dict(method='l1', target_latency='fast'), '`target_latency` must be'),
    (dict(method='l1', target_latency='-2ms'), '`target_latency` must be'),
    (dict(method='l1', target_latency=0.5, latency_kw=dict(runtime='tensorrt')), '`runtime`'),
    (dict(method='l1', target_latency=0.5, latency_kw=dict(threads=0)), '`threads`'),
    (dict(method='l1', target_latency=0.5, latency_kw=dict(timer='fast')), '`timer`'),
    (dict(method='l1', target_latency=0.5, latency_kw=dict(thread=2)), "no option.*'thread'"),
    (dict(method='l1', target_latency=0.5, latency_kw=[('threads', 2)]), '`latency_kw` must be a dict'),
    (dict(method='l1', target_macs=0.5, latency_kw=dict(threads=2)), '`target_latency` is not given'),
    (dict(method='l1', target_latency=0.5, widths='search'), "needs `target_macs`.*not `target_latency`"),
    (dict(method='l1', target_macs=0.5, prune_kw=dict(target_latency=0.5)), 'sets'),
])
def test_bad_input(kwargs, match, monkeypatch):
    learn = _dense(0, 0, cfg=[8, 'M', 16])
    calls = _count_fits(monkeypatch)
    sd = _state(learn.model)
    with pytest.raises(ValueError, match=match): learn.slim(**kwargs)
    assert calls == [] and _same(sd, _state(learn.model))

def test_teacher_is_the_original_network(monkeypatch):
    "Stage 3 distils from the network as the user trained it, not from its sparsity-trained copy"
    import fastslim.slim as S
    learn = _dense(0, epochs=1)
    original, seen = _state(learn.model), []
    class Spy(S.DistillCallback):
        def __init__(self, teacher, **kw):
            if teacher is not None: seen.append(_state(teacher))   # None: the config checking the options
            super().__init__(teacher, **kw)
    monkeypatch.setattr(S, 'DistillCallback', Spy)
    _slim(learn, 'slimming', target_macs=0.5, sparse_epochs=1, prune_epochs=1, finetune_epochs=1)
    assert len(seen) == 1 and _same(seen[0], original)

def test_interrupt_gives_back_the_dense_network(monkeypatch):
    "Ctrl-C in the last stage leaves `learn.model` as the user's dense network, so a second `learn.slim` starts from it"
    import fastslim.slim as S
    learn = _dense(0, 1, cfg=[16, 'M', 32, 'M', 64])
    sd, macs = _state(learn.model), None
    def die(self): raise KeyboardInterrupt
    monkeypatch.setattr(S.SlimRun, 'finetune', die)
    with pytest.raises(KeyboardInterrupt): _slim(learn, 'l1', target_macs=0.5, prune_epochs=0, finetune_epochs=1)
    assert _same(sd, _state(learn.model)) and fastslim.plan.plan_of(learn.model) is None
    monkeypatch.undo()
    r = _slim(learn, 'l1', target_macs=0.5, prune_epochs=0, finetune_epochs=1)
    assert r.stages[0]['macs'] == r.dense['macs'] and r.slim['macs'] < 0.6 * r.dense['macs']   # dense is really dense

def test_sparsity_guard_warns_and_strict_stops(tmp_path, monkeypatch):
    "A sparsity stage that ruins the network warns with the numbers; with `strict` it stops before pruning, checkpoints kept"
    import fastslim.slim as S
    from fastai.callback.core import Callback
    class Ruin(Callback):   # a sparsity stage gone wrong: every BatchNorm scale driven to zero
        def after_step(self):
            with torch.no_grad():
                for m in self.model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d): m.weight.zero_()
    monkeypatch.setattr(S.METHODS['slimming'], 'sparsity_cb', lambda cfg: Ruin())
    learn = _dense(0, 2, cfg=[16, 'M', 32, 'M', 64])
    sd = _state(learn.model)
    kw = dict(target_macs=0.5, sparse_epochs=1, prune_epochs=0, finetune_epochs=0)
    with pytest.warns(UserWarning, match='sparsity training cost.*steered to the budget.*`min_keep`'): _slim(copy.deepcopy(learn), 'slimming', **kw)
    class FixedRuin(Ruin): reg = 0.1   # a fixed strength: the advice is about `reg`
    monkeypatch.setattr(S.METHODS['slimming'], 'sparsity_cb', lambda cfg: FixedRuin())
    with pytest.warns(UserWarning, match='sparsity training cost.*lower `reg`'): _slim(copy.deepcopy(learn), 'slimming', **kw)
    with pytest.raises(fastslim.slim.SlimGuardError, match='points'): _slim(learn, 'slimming', strict=True, path=tmp_path, **kw)
    assert (tmp_path/'dense.pt').exists() and (tmp_path/'sparse.pt').exists() and not (tmp_path/'prune.pt').exists()
    assert _same(sd, _state(learn.model))

def test_sss_slim_model_saves_and_loads(tmp_path):
    "A Sparse Structure Selection result (branch scales, dead blocks replaced by shortcuts) loads back from `save_slim`, as `fastslim export` needs"
    from fastslim.plan import save_slim, load_slim
    from fastslim.sparsity import ShortcutBlock
    make = lambda: ResNet(depth=14, in_channels=1, stem_width=8, stage_widths=[8, 16, 32])
    learn = _dense(0, 1, model=make())
    _slim(learn, 'sss', ratio=0.5, sparse_epochs=1, prune_epochs=0, finetune_epochs=1)
    assert any(isinstance(m, ShortcutBlock) for m in learn.model.modules())
    save_slim(learn.model, tmp_path/'slim.pt')
    back = load_slim(tmp_path/'slim.pt', make)
    x = learn.dls.one_batch()[0][:4]
    with torch.no_grad(): assert torch.equal(back.eval()(x), learn.model.eval()(x))

def test_sss_prune_stage_trains_prune_epochs_at_lr(monkeypatch):
    "Sparse Structure Selection's stage 2 trains `prune_epochs` at `lr` with the dead blocks already removed (it once trained none)"
    from fastslim.blocks import ShortcutBlock
    learn = _method_learn('sss')
    fits, orig = [], Learner.fit_one_cycle
    def fit(self, n, lr, **kw):
        fits.append((n, lr, any(isinstance(m, ShortcutBlock) for m in self.model.modules())))
        return orig(self, n, lr, **kw)
    monkeypatch.setattr(Learner, 'fit_one_cycle', fit)
    r = _slim(learn, 'sss', ratio=0.5, sparse_epochs=1, prune_epochs=2, finetune_epochs=1, lr=5e-3)
    assert fits == [(1, 5e-3, False), (2, 5e-3, True), (1, 5e-3, True)], fits
    stages = {s['stage']: s for s in r.stages}
    assert stages['pruned (BN stats only)']['macs'] < 0.9 * r.dense['macs']   # the removed blocks no longer count

# --- stage 4: int8 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('quantize', ['qat', 'ptq'])
def test_quantize_stage_ends_with_an_int8_model_that_keeps_its_accuracy(quantize):
    pytest.importorskip('torchao')
    learn = _dense(0)
    r = _slim(learn, 'l1', target_macs=0.25, prune_epochs=1, finetune_epochs=2, quantize=quantize, qat_epochs=1)
    stages = {s['stage']: s for s in r.stages}
    assert list(stages)[-2:] == ['finetune', f'int8 ({quantize})']
    assert isinstance(learn.model, torch.fx.GraphModule)
    ops = {str(n.target) for n in learn.model.graph.nodes if n.op == 'call_function'}
    assert any('quantize_per_tensor' in o for o in ops)
    assert stages[f'int8 ({quantize})']['accuracy'] >= stages['finetune']['accuracy'] - 0.02
    assert r.slim['accuracy'] == pytest.approx(accuracy_of(learn))
    assert r.slim['size'] * 8 <= r.dense['size']            # 4x fewer MACs and int8 weights: far smaller than dense fp32
    assert r.settings['quantize'] == quantize

@pytest.mark.parametrize('kw, match', [(dict(method='l1', quantize='int4'), '`quantize`'),
                                       (dict(method='l1', quantize='qat', qat_epochs=0), '`qat_epochs`'),
                                       (dict(method='magnitude', ratio=0.5, quantize='ptq'), 'compacted')])
def test_quantize_options_are_checked_before_training(kw, match):
    learn = _dense(0, epochs=1)
    before = _state(learn.model)
    kw = {'target_macs': 0.5, **kw} if 'ratio' not in kw else kw
    with pytest.raises(ValueError, match=match): _slim(learn, **kw)
    assert _same(before, _state(learn.model))

# ---------------------------------------------------------------- widths found by search (issue #22)

def test_slim_with_searched_widths(tmp_path):
    "`widths='search'`: stage 2 masks the best trial's widths within the MACs budget; the study lives in the run folder"
    pytest.importorskip('optuna')
    learn = _dense(0, epochs=3)
    r = _slim(learn, 'l1', target_macs=0.3, widths='search', search_kw=dict(n_trials=4), prune_epochs=1, finetune_epochs=1, path=tmp_path)
    eff = r.slim['macs'] / r.dense['macs']
    assert eff <= 0.3 * 1.02, eff                                       # every trial meets the budget
    assert r.settings['widths'] == 'search' and r.settings['search_trials'] == 4
    assert (tmp_path/'search.db').exists() and (tmp_path/'search.png').exists()
    assert r.slim['accuracy'] > 0.8, r.slim['accuracy']

@pytest.mark.parametrize('kw, match', [
    (dict(method='l1', ratio=0.5, widths='search'), '`target_macs`'),
    (dict(method='magnitude', ratio=0.5, widths='search'), 'named criterion'),
    (dict(method='l1', target_macs=0.5, widths='search', search_kw=dict(trials=3)), "no option.*'trials'"),
    (dict(method='l1', target_macs=0.5, search_kw=dict(n_trials=3)), "`widths` is 'global'"),
    (dict(method='l1', target_macs=0.5, widths='grid'), '`widths`'),
    (dict(method='l1', target_macs=0.5, widths='search', schedule='agp'), 'one-shot')])
def test_search_options_are_checked_before_training(kw, match):
    learn = _dense(0, epochs=1)
    before = _state(learn.model)
    with pytest.raises(ValueError, match=match): _slim(learn, **kw)
    assert _same(_state(learn.model), before)

# ---------------------------------------------------------------- latency budgets (issue #19)
# Every timer is `test_latency.FakeTimer`: a cost computed from the layer widths, so nothing is timed for real.

@pytest.mark.filterwarnings('ignore:the measured speed-up:UserWarning')   # the report's real timing of a tiny net, not the budget's
@pytest.mark.parametrize('method', ['l1', 'slimming'])
def test_slim_to_a_latency_budget(method, tmp_path):
    "`target_latency=0.5`: the slim network's latency (the fake runtime's) lands within 5% of half the dense one's; the report says how it was timed"
    from test_latency import FakeTimer
    learn = _dense(0, 1, cfg=[16, 'M', 32, 'M', 64])
    dense, t = copy.deepcopy(learn.model), FakeTimer()
    r = _slim(learn, method, target_latency=0.5, latency_kw=dict(timer=t, cache_dir=tmp_path, reps=1), **_epochs(method))
    ratio = t.cost(learn.model) / t.cost(dense)
    assert abs(ratio / 0.5 - 1) <= 0.05, ratio
    stages = {s['stage']: s for s in r.stages}
    assert stages['pruned (BN stats only)']['latency'] == pytest.approx(ratio, abs=1e-4) and stages['pruned (BN stats only)']['latency_goal'] == 0.5
    s = r.settings
    assert s['target_latency'] == 0.5 and s['target_macs'] is None and s['latency_runtime'] == 'test_latency.FakeTimer'
    assert s['latency_measured'] == pytest.approx(ratio, abs=1e-4) and s['latency_dense_ms'] == pytest.approx(1e3 * t.cost(dense), rel=1e-3)
    assert r.slim['macs'] < 0.75 * r.dense['macs']
    assert len(list(tmp_path.iterdir())) == 1                                   # one table file, measured once
    if method == 'slimming':   # stage 1 was steered by the MACs of a latency selection; stage 2 read its tables back
        assert 0.2 < s['sparsity_target_macs'] < 0.8 and s['latency_tables'] == 'cached'
    else: assert 'sparsity_target_macs' not in s and s['latency_tables'].startswith('measured')

@pytest.mark.filterwarnings('ignore:the measured speed-up:UserWarning')
def test_slim_to_a_latency_budget_in_milliseconds(tmp_path):
    from test_latency import FakeTimer
    learn = _dense(0, 0, cfg=[16, 'M', 32, 'M', 64])
    t = FakeTimer()
    ms = 0.4 * 1e3 * t.cost(learn.model)
    r = _slim(learn, 'l1', target_latency=f'{ms:.6f}ms', latency_kw=dict(timer=t, cache_dir=tmp_path, reps=1), prune_epochs=0, finetune_epochs=0)
    assert abs(1e3 * t.cost(learn.model) / ms - 1) <= 0.05
    assert r.settings['target_latency'].endswith('ms')

def test_latency_config_round_trip():
    "`to_dict` (run.json) holds the budget and its options; `from_dict` gives the same config back; both are part of the resume fingerprint"
    from fastslim.slim import SlimConfig
    cfg = SlimConfig.from_kwargs('l1', target_latency=' 2.5MS ', latency_kw=dict(runtime='torch', threads=2), round_to=8)
    assert cfg.target_latency == '2.5ms' and cfg.latency_kw == dict(runtime='torch', threads=2) and cfg.prune_kw == dict(round_to=8)
    d = cfg.to_dict()
    assert d['target_latency'] == '2.5ms' and d['latency_kw'] == dict(runtime='torch', threads=2)
    assert SlimConfig.from_dict(d) == cfg and SlimConfig.from_dict(d).to_dict() == d
    fp = cfg.fingerprint()
    assert fp['target_latency'] == '2.5ms' and fp != SlimConfig('l1', target_latency=0.5, latency_kw=dict(runtime='torch', threads=2)).fingerprint()
    assert fp != SlimConfig('l1', target_latency='2.5ms', latency_kw=dict(runtime='torch')).fingerprint()
    assert 'target_latency' not in SlimConfig('l1', target_macs=0.5).fingerprint()   # runs saved before the field existed still resume
    cb = fastslim.slim.METHODS['l1'].callback(cfg)
    assert cb.target_latency == '2.5ms' and cb.latency_kw == dict(runtime='torch', threads=2) and cb.round_to == 8

@pytest.mark.parametrize('min_keep,narrowest', [(None, 2), (1, 1)])
def test_default_floor_never_leaves_a_one_channel_layer(min_keep, narrowest):
    "An unreachable budget puts every group at its floor: the default fraction keeps 2 channels of an 8-wide stage, a count of 1 keeps 1"
    learn = _dense(0, 1, model=ResNet(depth=14, in_channels=1, stem_width=8, stage_widths=[8, 16, 32]))
    kw = {} if min_keep is None else dict(min_keep=min_keep)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the budget is out of reach on purpose
        _slim(learn, 'l1', target_macs=0.01, prune_epochs=0, finetune_epochs=1, **kw)
    widths = [m.out_channels for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert min(widths) == narrowest, widths

def test_steered_stage_ranks_with_the_criterions_reduce():
    "`learn.slim('slimming', reduce='mean')` steers stage 1 by the averaged scales its pruning ranks by; summed by default"
    from fastslim.slim import METHODS, SlimConfig
    cb = lambda **kw: METHODS['slimming'].sparsity_cb(SlimConfig.from_kwargs('slimming', target_macs=0.5, **kw))
    assert cb().reduce == 'sum' and cb(reduce='mean').reduce == 'mean'
    with pytest.raises(ValueError, match='`reduce`'): cb(reduce='max')
