"""Pruning criteria on real data: a small CNN trained for 3 epochs on scikit-learn's digits, pruned by each criterion.

Bounds stated here: after pruning 40% of the channels (or 50% of the weights) and fine-tuning 2 epochs with the
masks held by `MaskCallback`, validation accuracy stays within 10 points of the dense model's (measured: within
2 points for every criterion). ThiNet and regression, which rewrite the next layer, stay within 10 points even
before fine-tuning, where L1-norm pruning drops to near chance."""
import copy, warnings
import pytest, torch
from torch import nn
from fastai.vision.all import Learner, CrossEntropyLossFlat, accuracy, set_seed
from fastslim.core import count_macs, eval_mode
from fastslim.data import digits_dls
from fastslim.plan import SlimPlan
from fastslim.prune import MaskCallback
from fastslim.criteria import *

warnings.filterwarnings('ignore', message='.*CUDA is not available.*')
BOUND = 0.10     # accuracy points a pruned and fine-tuned model may lose against the dense one

def conv_bn(ni, no): return [nn.Conv2d(ni, no, 3, padding=1, bias=False), nn.BatchNorm2d(no), nn.ReLU()]

def digits_cnn():
    "Four conv-BN-ReLU layers (16, 32, pool, 32, 64 channels), average pooling, a linear head: groups '0', '3', '7', '10'"
    return nn.Sequential(*conv_bn(1, 16), *conv_bn(16, 32), nn.MaxPool2d(2), *conv_bn(32, 32), *conv_bn(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

def learner(dls, model, cbs=None):
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    learn.recorder.train_metrics = False
    return learn

def fit(learn, epochs, lr):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return learn

def acc(learn):
    with learn.no_bar(): return float(learn.validate()[1])

def seeded_dls():
    "Digits `DataLoaders` whose shuffling is the same in every test, whatever ran before"
    set_seed(0)
    return digits_dls(bs=64)

@pytest.fixture
def dls(): return seeded_dls()

@pytest.fixture(scope='module')
def trained():
    "(trained model, its validation accuracy); tests prune deep copies"
    torch.manual_seed(0)   # module-scoped: seeded here, so the weights do not depend on which test ran first
    dls = seeded_dls()
    learn = fit(learner(dls, digits_cnn()), 3, 1e-2)
    return learn.model.eval(), acc(learn)

@pytest.fixture
def fresh(trained, dls):
    net = copy.deepcopy(trained[0])
    return net, SlimPlan(net, dls.valid.one_batch()[0][:2])

def zero_filters(g):
    "Output filters of the group's root layer whose weights are all exactly zero (counted on the weights)"
    return int((g.root.weight.detach().flatten(1).abs().sum(1) == 0).sum())

def masked_entries_zero(plan):
    return all(bool((p.detach()[r] == 0).all()) for p, r in plan.param_masks().items())

# %% the registry and bad input

def test_registry():
    assert set(list_criteria()) >= {'l1', 'thinet', 'regression', 'slimming', 'sss', 'sfp', 'magnitude', 'taylor', 'fpgm'}
    with pytest.raises(ValueError, match="known criteria.*'thinet'"): get_criterion('obd')
    with pytest.raises(ValueError, match='n_batches'): get_criterion('l1', n_batches=2)
    with pytest.raises(TypeError, match='`criterion`'): get_criterion(3)
    c = ThiNet(n_batches=2)
    assert get_criterion(c) is c and get_criterion('THINET', n_batches=3).n_batches == 3
    assert isinstance(get_criterion(FPGM), FPGM)
    with pytest.raises(ValueError, match='n_batches'): ThiNet(n_batches=0)
    expect = dict(l1='local', thinet='local', regression='local', slimming='global', sfp='local', taylor='global', fpgm='local',
                  magnitude='global', sss='global')
    assert {n: get_criterion(n).default_scope for n in expect} == expect
    assert get_criterion('sfp').soft and not get_criterion('l1').soft
    assert get_criterion('magnitude').granularity == 'weight' and get_criterion('sss').granularity == 'block'
    assert {n for n in list_criteria() if get_criterion(n).needs_data} == {'thinet', 'regression', 'taylor'}

def test_bad_input_changes_nothing(fresh, dls):
    net, plan = fresh
    before = copy.deepcopy(net.state_dict())
    for name in ('thinet', 'regression', 'taylor'):
        with pytest.raises(ValueError, match='`dls`'): get_criterion(name).prune(plan, 0.5)
    batches = [dls.one_batch()]                                              # data with no loss attached
    with pytest.raises(ValueError, match='`loss_func`'): Taylor().prune(plan, 0.5, dls=batches)
    with pytest.raises(ValueError, match='`ratio`'): L1Norm().prune(plan, 1.0)
    with pytest.raises(ValueError, match='`ratio`'): ThiNet().prune(plan, -0.1, dls=dls)
    with pytest.raises(ValueError, match='`scope`'): L1Norm().prune(plan, 0.5, scope='layer')
    with pytest.raises(ValueError, match='exactly one'): L1Norm().prune(plan, 0.5, target_macs=0.5)
    with pytest.raises(ValueError, match="global"): L1Norm().prune(plan, target_macs=0.5, scope='local')
    with pytest.raises(ValueError, match="'nope'"): L1Norm().prune(plan, {'nope': 0.5})
    with pytest.raises(ValueError, match=r"ratio\['3'\]"): L1Norm().prune(plan, {'3': 2})
    with pytest.raises(ValueError, match='`ratio`'): Magnitude().prune(plan, 1.5)
    with pytest.raises(ValueError, match='`model`'): SSS().prune(net, 0.5)    # no branch scales
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(g.keep.all() for g in plan.groups)

# %% every channel criterion: exact counts, no empty layer, trains with masks held, accuracy bound

CRITERIA = ['l1', 'thinet', 'regression', 'slimming', 'sfp', 'taylor', 'fpgm']

@pytest.mark.parametrize('name', CRITERIA)
def test_channel_criterion(name, fresh, trained, dls):
    net, plan = fresh
    crit = get_criterion(name, **(dict(loss_func=CrossEntropyLossFlat()) if name == 'taylor' else {}))
    ratio = 0.4
    crit.prune(plan, ratio, dls=dls)
    removed = {g.name: zero_filters(g) for g in plan.groups}
    assert removed == {g.name: g.size - g.n_keep for g in plan.groups}      # the weights are zero where the masks say
    if crit.default_scope == 'local': assert removed == {g.name: round(ratio * g.size) for g in plan.groups}
    else: assert sum(removed.values()) == round(ratio * sum(g.size for g in plan.groups))
    assert all(zero_filters(g) < g.size for g in plan.groups)               # no layer is emptied
    learn = fit(learner(dls, net, cbs=MaskCallback(plan)), 2, 1e-2)
    assert masked_entries_zero(plan)
    assert {g.name: zero_filters(g) for g in plan.groups} == removed
    assert acc(learn) >= trained[1] - BOUND, (name, acc(learn), trained[1])

def test_reconstruction_keeps_accuracy_before_fine_tuning(trained, dls):
    "40% of every group removed: ThiNet and regression keep the network working with no fine-tuning; L1-norm does not"
    res = {}
    for name in ('l1', 'thinet', 'regression'):
        net = copy.deepcopy(trained[0])
        get_criterion(name).prune(SlimPlan(net, dls.valid.one_batch()[0][:2]), 0.4, dls=dls)
        res[name] = acc(learner(dls, net))
    assert res['thinet'] >= trained[1] - BOUND and res['regression'] >= trained[1] - BOUND, res
    assert res['l1'] < trained[1] - BOUND, res

def test_magnitude(fresh, trained, dls):
    net, plan = fresh
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    head = layers.pop('15')
    Magnitude().prune(plan, 0.5)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.5 * total)
    assert all(bool((m.weight != 0).any()) for m in layers.values()) and bool((head.weight != 0).all())
    learn = fit(learner(dls, net, cbs=MaskCallback(plan)), 2, 1e-2)
    assert masked_entries_zero(plan)
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) >= round(0.5 * total)
    assert acc(learn) >= trained[1] - BOUND

# %% per-group ratios, tied channels, MACs budgets with normalised global scores

def test_per_group_ratios(fresh):
    net, plan = fresh
    L1Norm().prune(plan, {'3': 0.5, '10': 0.25})
    assert {g.name: zero_filters(g) for g in plan.groups} == {'0': 0, '3': 16, '7': 0, '10': 16}
    s = plan.l1_scores()['3']                                    # the lowest-L1 filters are the ones removed
    assert set((~plan['3'].keep).nonzero().flatten().tolist()) == set(torch.argsort(s)[:16].tolist())
    L1Norm().prune(plan, {'': 0.25, '3': 0.5})                    # '' is every group; the longest key wins
    assert {g.name: g.size - g.n_keep for g in plan.groups} == {'0': 4, '3': 16, '7': 8, '10': 16}
    select_per_group(plan, plan.l1_scores(), {'10': 0.9}, min_keep=0.5)
    assert plan['10'].n_keep == 32 and all(g.keep.all() for g in plan.groups if g.name != '10')

def test_per_group_ratios_respect_tied_channels():
    "A grouped convolution ties channel j to j+period: they are removed together"
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    plan = SlimPlan(net, torch.randn(2, 1, 8, 8))
    g = plan['0']
    assert g.period < g.size
    select_per_group(plan, plan.l1_scores(), {'0': 0.5})
    assert g.size - g.n_keep == 8
    keep = g.keep.view(-1, g.period)
    assert bool((keep == keep[0]).all())

@pytest.mark.parametrize('name', ['l1', 'taylor', 'fpgm', 'thinet'])
def test_target_macs_with_normalised_scores(name, fresh, dls):
    "Global selection on normalised scores lands on a MACs budget without emptying a layer"
    net, plan = fresh
    learn = learner(dls, net)                       # a Learner as `dls` gives data and, for taylor, the loss
    get_criterion(name).prune(plan, target_macs=0.5, dls=learn)
    x = plan.example[0][:1]
    frac = count_macs(plan.compact(), x) / count_macs(net, x)
    assert 0.45 <= frac <= 0.55, frac
    assert all(g.n_keep >= 1 for g in plan.groups)

# %% ThiNet and regression: a better next layer than the L1-norm choice

LAYERS = [('0', '3'), ('3', '7'), ('7', '10'), ('10', '15')]     # (pruned group, the layer that reads it)

def next_layer_error(dense, dls, group, scores_of, rec=None, ratio=0.5):
    "Relative error of the consumer's output on held-out (validation) batches after removing `ratio` of `group`"
    net = copy.deepcopy(dense); plan = SlimPlan(net, dls.valid.one_batch()[0][:2])
    select_per_group(plan, scores_of(plan), {group: ratio})
    assert plan[group].size - plan[group].n_keep == round(ratio * plan[group].size)
    if rec is not None: rec.reconstruct(plan, dls)                # fitted on training batches
    plan.apply()
    return layer_error(net, dense, dict(LAYERS)[group], dls)

@pytest.mark.parametrize('group', [g for g, _ in LAYERS])
def test_thinet_choice_beats_l1_with_the_same_reconstruction(group, trained, dls):
    """Fair comparison of the channel *choice*: the same number of channels is removed from one group by ThiNet and
    by L1-norm, and the same reconstruction is applied to both: ThiNet's per-channel least-squares scales, the
    objective ThiNet's greedy selects for. ThiNet's choice leaves a smaller next-layer error on held-out data, in
    every layer."""
    crit, rec = get_criterion('thinet'), ThiNet()
    own = next_layer_error(trained[0], dls, group, lambda plan: crit.scores(plan, dls), rec)
    l1 = next_layer_error(trained[0], dls, group, lambda plan: plan.l1_scores(), rec)
    assert own < l1, (own, l1)

def test_regression_choice_beats_l1_on_average(trained, dls):
    """The same comparison for He et al.'s LASSO choice. LASSO selects for its own joint objective, not for ThiNet's
    per-channel scales, so it is not better in every layer (measured: worse in one of the four, 0.23 against 0.17);
    over the four layers its mean next-layer error is lower than L1's, and it wins in at least three."""
    crit, rec = get_criterion('regression'), ThiNet()
    own = [next_layer_error(trained[0], dls, g, lambda plan: crit.scores(plan, dls), rec) for g, _ in LAYERS]
    l1 = [next_layer_error(trained[0], dls, g, lambda plan: plan.l1_scores(), rec) for g, _ in LAYERS]
    assert sum(own) < sum(l1), (own, l1)
    assert sum(a < b for a, b in zip(own, l1)) >= 3, (own, l1)

@pytest.mark.parametrize('group', ['3', '7'])
@pytest.mark.parametrize('name', ['thinet', 'regression'])
def test_pipeline_beats_l1_and_reconstruction_helps(name, group, trained, dls):
    """Each method as published (its choice, then its own reconstruction: ThiNet's scales, regression's full
    least-squares weights) against L1-norm pruning as Li et al. do it (no reconstruction, before fine-tuning);
    and each reconstruction lowers the held-out error of both choices.
    Not asserted: regression's LASSO choice against L1's when *both* get the full least-squares refit. On this small
    CNN a refitted 3x3 convolution reproduces its output about equally well from either half of the channels (the
    differences are within the noise of the sampled data), so that comparison would test luck, not the method."""
    crit = get_criterion(name)
    own_scores, l1_scores = (lambda plan: crit.scores(plan, dls)), (lambda plan: plan.l1_scores())
    own = next_layer_error(trained[0], dls, group, own_scores, crit)
    l1_raw = next_layer_error(trained[0], dls, group, l1_scores)
    assert own < l1_raw, (own, l1_raw)
    assert own < next_layer_error(trained[0], dls, group, own_scores)
    assert next_layer_error(trained[0], dls, group, l1_scores, crit) < l1_raw

def test_thinet_greedy_is_exact_on_small_problem():
    "On a tiny Gram matrix the greedy's first pick is the channel whose own contribution is smallest"
    A = torch.tensor([[1., 0., 0.], [0., 2., 0.], [0., 0., 3.]], dtype=torch.float64)
    assert thinet_order(A.T @ A).tolist() == [1., 2., 3.]
    A = torch.tensor([[1., -1., 3.]], dtype=torch.float64)       # channels 0 and 1 cancel: removing both costs 0
    steps = thinet_order(A.T @ A)
    assert set(torch.argsort(steps)[:2].tolist()) == {0, 1}

def test_lasso_order_finds_the_relevant_channels():
    "y depends on channels 0 and 2 only: they enter the LASSO path first"
    torch.manual_seed(0)
    A = torch.randn(200, 5, dtype=torch.float64)
    A[:, [1, 3, 4]] *= 1e-3
    s = lasso_order(A.T @ A)
    assert set(torch.argsort(s, descending=True)[:2].tolist()) == {0, 2}

# %% Sparse Structure Selection: blocks

def test_sss_removes_blocks(dls):
    from torchvision.models.resnet import BasicBlock
    from fastslim.sparsity import BlockSparsityCallback, remove_dead_blocks, ShortcutBlock, branch_scales
    set_seed(0)
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    net = nn.Sequential(*conv_bn(1, 16), *[BasicBlock(16, 16) for _ in range(3)], BasicBlock(16, 32, 2, ds),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    learn = fit(learner(dls, net, cbs=BlockSparsityCallback(reg=0.5)), 3, 1e-2)
    dense_acc = acc(learn)
    crit = SSS()
    s = crit.scores(net)
    assert len(s) == 4 and all(v >= 0 for v in s.values())
    crit.prune(learn, 0.5)
    scales = branch_scales(net)
    assert sum(v == 0 for v in scales.values()) == 2
    assert all(scales[k] == 0 for k in sorted(s, key=s.get)[:2])   # the smallest scales were zeroed
    slim = remove_dead_blocks(net)
    assert sum(isinstance(m, ShortcutBlock) for m in slim.modules()) == 2
    xb = dls.valid.one_batch()[0]
    with torch.no_grad(), eval_mode(net), eval_mode(slim): assert torch.allclose(net(xb), slim(xb), atol=1e-5)
    tuned = fit(learner(dls, slim), 1, 1e-2)
    assert acc(tuned) >= dense_acc - BOUND

# %% with fastslim.prune.PruneCallback

@pytest.mark.parametrize('name', ['thinet', 'taylor'])
def test_data_driven_criteria_in_prune_callback(name, dls):
    "The callback passes the learner's `DataLoaders`: enough for ThiNet's data and Taylor's loss"
    from fastslim.prune import PruneCallback
    cb = PruneCallback(ratio=0.4, criterion=name, n_batches=2, end=0.5)
    fit(learner(dls, digits_cnn(), cbs=cb), 1, 1e-2)
    assert cb.log[-1]['total'] - cb.log[-1]['kept'] == round(0.4 * 144)
    assert masked_entries_zero(cb.plan)


def test_slimming_sums_the_scales_of_a_residual_stream():
    "On timm's fastslim ResNet-20, a stream channel scores the sum of its BatchNorms' |gamma|; with equal scales the streams outrank the blocks"
    import timm, fastslim.models  # registers the CIFAR zoo with timm
    from fastslim.plan.group import bn_members
    net = timm.create_model('fastslim_resnet20_cifar', num_classes=10).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d): m.weight.uniform_(0.5, 1.5)
    plan = SlimPlan(net, torch.randn(2, 3, 32, 32))
    n_bns = {g.name: len(bn_members(g)) for g in plan.groups}
    assert max(n_bns.values()) >= 4 and min(n_bns.values()) == 1      # streams (stem + blocks) and block-internal groups
    sums, means = Slimming().scores(plan), Slimming(reduce='mean').scores(plan)
    for g in plan.groups:
        want = torch.stack([b.weight.detach().abs()[i] for b, i in bn_members(g)]).sum(0)
        torch.testing.assert_close(sums[g.name], want)
        torch.testing.assert_close(means[g.name], want / n_bns[g.name])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d): m.weight.fill_(1.)
    plan.select(Slimming().scores(plan), ratio=0.3)
    cut = {g.name: int((~g.keep).sum()) for g in plan.groups}
    assert all(cut[k] == 0 for k, v in n_bns.items() if v > 1)        # the streams keep every channel ...
    assert sum(cut[k] for k, v in n_bns.items() if v == 1) > 0        # ... and the 30% comes from inside the blocks
    with pytest.raises(ValueError, match='`reduce`'): Slimming(reduce='max')
