"PruneCallback: schedules honoured, exact shares, soft (SFP) regrowth, MACs budget, rewinding, scratch baselines, bad input."
import copy
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastslim.core import count_macs, count_params
from fastslim.data import digits_dls
from fastslim.models import vgg_tiny
from fastslim.prune import PruneCallback, scratch_model, scratch_e, scratch_epochs
from fastslim.schedule import AGP, Iterative

l1 = lambda plan, dls: plan.l1_scores()
l2 = lambda plan, dls: plan.l2_scores()

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64)

def fit(dls, epochs, cb, lr=1e-2, model=None):
    learn = Learner(dls, model or vgg_tiny(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cb)
    return learn

@pytest.mark.parametrize('schedule,n', [('one-shot', 1), ('iterative', 3), ('agp', 4)])
def test_schedule_steps_honour_start_and_end(dls, schedule, n):
    cb = PruneCallback(ratio=0.5, criterion=l1, scope='local', schedule=schedule, n_steps=n, start=0.25, end=0.75)
    learn = fit(dls, 4, cb)
    n_iters = 4 * len(dls.train)
    iters = [r['iter'] for r in cb.log]
    assert len(iters) == n
    assert iters[0] == round(0.25 * n_iters) and iters[-1] < 0.75 * n_iters
    assert cb.log[-1]['frac'] == 1
    assert cb.log[-1]['kept'] == sum(g.size - round(0.5 * g.size) for g in cb.plan.groups)
    masks = cb.plan.param_masks()
    assert all((p[r] == 0).all() for p, r in masks.items())

def test_exact_global_share_and_no_empty_layer(dls):
    cb = PruneCallback(ratio=0.6, criterion=lambda plan, dls: plan.bn_scores())
    fit(dls, 1, cb)
    total = sum(g.size for g in cb.plan.groups)
    assert total - cb.log[-1]['kept'] == round(0.6 * total)
    assert all(g.n_keep >= 1 for g in cb.plan.groups)

def test_weight_granularity_exact_share(dls):
    cb = PruneCallback(ratio=0.7, criterion=lambda plan, dls: {}, granularity='weight')
    fit(dls, 1, cb)
    masks = [m.slim_weight_mask for m in cb.plan.model.modules() if hasattr(m, 'slim_weight_mask')]
    n = sum(m.numel() for m in masks)
    assert abs(sum(int((~m).sum()) for m in masks) - round(0.7 * n)) <= len(masks)   # +1 kept per layer at most
    assert all(m.any() for m in masks)

def test_soft_filter_pruning_regrows_then_final_mask_compacts(dls):
    "A filter zeroed at one epoch end holds non-zero weights later; at the end exactly the last mask is removed"
    seen = []
    class Spy(PruneCallback):
        def _prune_step(self, frac):
            if self.plan.groups and self.log:   # before re-selecting: did last epoch's zeroed filters regrow?
                seen.append(any((p[r] != 0).any() for p, r in self.plan.param_masks(filters_only=True).items() if p.ndim > 1))
            super()._prune_step(frac)
    cb = Spy(ratio=0.5, criterion=l2, scope='local', soft=True, end=1.)
    learn = fit(dls, 3, cb)
    assert len(cb.log) == 3 and any(seen)
    assert all((p[r] == 0).all() for p, r in cb.plan.param_masks().items())   # after_fit zeroes the last mask
    small = dict(cb.plan.compact().named_modules())
    assert all(small[g.name].out_channels == g.n_keep == g.size - round(0.5 * g.size) for g in cb.plan.groups)

@pytest.mark.parametrize('target', [0.5, 0.3])
def test_target_macs_callback(dls, target):
    cb = PruneCallback(target_macs=target, criterion=l1, compact_at_end=True)
    learn = fit(dls, 1, cb)
    x = dls.one_batch()[0][:1]
    assert abs(count_macs(learn.model, x) / count_macs(vgg_tiny(), x) - target) <= 0.02

def test_lottery_rewinding(dls):
    "Survivors are reset to their values from the rewind epoch"
    snaps = {}
    class Spy(PruneCallback):
        def _rewind(self):
            super()._rewind()
            snaps['w'] = self.learn.model.features[2].conv.weight.detach().clone()
    cb = Spy(ratio=0.5, criterion=l1, scope='local', start=0.5, end=0.9, rewind_epoch=1)
    fit(dls, 2, cb)
    rewound = cb.rewind_state['features.2.conv.weight']
    kept = snaps['w'] != 0
    assert torch.equal(snaps['w'][kept], rewound[kept])

def test_bad_input_before_any_weight_changes(dls):
    for kw, word in [(dict(ratio=1.0), '`ratio`'), (dict(ratio=-1), '`ratio`'), (dict(), 'exactly one'),
                     (dict(ratio=.5, target_macs=.5), 'exactly one'), (dict(target_macs=1.), '`target_macs`'),
                     (dict(ratio=.5, schedule='x'), '`schedule`'), (dict(ratio=.5, scope='x'), '`scope`'),
                     (dict(ratio=.5, rewind_epoch=-1), '`rewind_epoch`'), (dict(ratio=.5, start=.8, end=.2), 'start'),
                     (dict(ratio=.5, min_keep=-1), '`min_keep`'), (dict(ratio=.5, min_keep=float('nan')), '`min_keep`'),
                     (dict(ratio=.5, min_keep=1.5), '`min_keep`'), (dict(ratio=.5, soft='x'), '`soft`'),
                     (dict(ratio=.5, verify='x'), '`verify`')]:
        with pytest.raises(ValueError, match=word): PruneCallback(criterion=l1, **kw)
    from fastslim.prune import MaskCallback
    with pytest.raises(ValueError, match='`plan`'): MaskCallback(None)

def test_scratch_baselines(dls):
    cb = PruneCallback(ratio=0.5, criterion=l1, scope='local', compact_at_end=True)
    learn = fit(dls, 1, cb)
    small = learn.model
    fresh = scratch_model(small, seed=1)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in small.parameters()]
    x = dls.one_batch()[0][:1]
    assert scratch_epochs(2, count_macs(vgg_tiny(), x), count_macs(small, x), 'B') > 2
    sl = scratch_e(dls, small, 2, seed=0, metrics=accuracy)
    assert sl.validate()[1] > 0.5
