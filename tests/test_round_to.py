"`round_to`: kept widths are multiples (or whole groups) in every selection mode, the floor is rounded up, MACs targets still land, bad values fail first."
import math, warnings
import pytest, timm, torch, torchvision
from torch import nn
from fastai.learner import Learner
from fastai.metrics import accuracy
import fastslim.models   # registers the CIFAR zoo with timm
from fastslim.core import count_macs, eval_mode
from fastslim.criteria import L1Norm, get_criterion
from fastslim.data import digits_dls
from fastslim.models import vgg_tiny
from fastslim.plan import SlimPlan
from fastslim.plan.select import select_per_group
from fastslim.prune import PruneCallback
from fastslim.report import SlimReport, speed_warning
import fastslim.slim   # patches `Learner.slim`
from fastslim.test_utils import randomize_bn

ARCHS = {'resnet18': lambda: torchvision.models.resnet18(num_classes=10),
         'mobilenet_v2': lambda: torchvision.models.mobilenet_v2(num_classes=10),   # depthwise convs
         'resnext': lambda: torchvision.models.resnext50_32x4d(num_classes=10),     # grouped convs: units of 32 channels
         'resnet56': lambda: timm.create_model('fastslim_resnet56_cifar')}
_plans = {}

def plan_for(arch):
    "One plan per architecture (selection rewrites every mask, so tests can share it)"
    if arch not in _plans:
        torch.manual_seed(0)
        _plans[arch] = SlimPlan(ARCHS[arch](), torch.randn(1, 3, 32, 32), verify=False)
    return _plans[arch]

def unit(g, r): return math.lcm(r, g.unit_width)

def rounded(plan, r):
    "Groups whose kept width is neither a multiple of lcm(round_to, unit width) nor the whole group"
    return [(g.name, g.size, g.n_keep) for g in plan.groups if g.n_keep != g.size and g.n_keep % unit(g, r)]

def odd_cnn():
    "Widths 12 (not a multiple of 8), 6 (narrower than 8) and 20"
    return nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 10))

# ---------------------------------------------------------------- multiples in every selection mode
MODES = [dict(ratio=0.5), dict(ratio=0.3, scope='local'), dict(target_macs=0.5), dict(ratio=0.6, min_keep=0.25)]

@pytest.mark.parametrize('arch', list(ARCHS))
@pytest.mark.parametrize('kw', MODES, ids=lambda kw: '-'.join(f'{k}={v}' for k, v in kw.items()))
def test_kept_widths_are_multiples(arch, kw):
    plan = plan_for(arch)
    plan.select(plan.l1_scores(), round_to=8, **kw)
    assert rounded(plan, 8) == []
    assert any(g.n_keep < g.size for g in plan.groups)
    for g in plan.groups:
        assert g.period == g.size or g.keep.view(-1, g.period).all(0).eq(g.keep.view(-1, g.period).any(0)).all()  # tied units whole
    if 'min_keep' in kw:   # the floor, rounded up: ceil(0.25 * size) channels, then up to a multiple of 8
        assert all(g.n_keep >= min(g.size, math.ceil(math.ceil(0.25 * g.size) / unit(g, 8)) * unit(g, 8)) for g in plan.groups)

def test_grouped_convs_compose_with_round_to():
    "ResNeXt's tied groups (32 channels per unit) keep multiples of lcm(8, 32) = 32; its plain groups multiples of 8"
    plan = plan_for('resnext')
    plan.select(plan.l1_scores(), ratio=0.5, round_to=8)
    tied = [g for g in plan.groups if g.unit_width > 1]
    assert tied and {g.unit_width for g in tied} == {32}
    assert all(g.n_keep % 32 == 0 for g in tied) and any(g.n_keep < g.size for g in tied)
    assert any(g.n_keep % 16 == 8 for g in plan.groups if g.unit_width == 1)   # 8, not only lcm multiples elsewhere

@pytest.mark.parametrize('arch', ['mobilenet_v2', 'resnext'])
def test_rounded_plan_compacts_to_multiples_and_equal_outputs(arch):
    torch.manual_seed(0)
    model = randomize_bn(ARCHS[arch]()).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = SlimPlan(model, x, verify=False)
    plan.select(plan.l2_scores(), target_macs=0.5, round_to=8).apply()
    small = plan.compact()
    convs = {n: m for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    dense = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    changed = [n for n in convs if convs[n].out_channels != dense[n].out_channels]
    assert changed and all(convs[n].out_channels % 8 == 0 for n in changed)
    with torch.no_grad(), eval_mode(model), eval_mode(small):
        ya, yb = model(x), small(x)
    assert ya.abs().max() > 0 and ((ya - yb).abs().max() / ya.abs().max()) <= 1e-4

def test_narrow_and_odd_groups():
    "A 6-channel group (narrower than 8) stays whole; a 12-channel one keeps 8 or 12; a 20-channel one 8, 16 or 20"
    plan = SlimPlan(odd_cnn(), torch.randn(2, 1, 8, 8), verify=False)
    widths = {g.size: set() for g in plan.groups}
    for kw in [dict(ratio=r, scope=s) for r in (0.1, 0.3, 0.5, 0.7, 0.9) for s in ('global', 'local')] + [dict(target_macs=t) for t in (0.2, 0.5, 0.8)]:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')   # target_macs=0.2 is below the floor here: selection says so
            plan.select(plan.l1_scores(), round_to=8, **kw)
        for g in plan.groups: widths[g.size].add(g.n_keep)
    assert widths[6] == {6} and widths[12] <= {8, 12} and widths[20] <= {8, 16, 20}
    assert 8 in widths[12] and {8, 16} <= widths[20]
    g = {g.size: g for g in plan.groups}
    assert g[12].kept_units(1, 8) == [12, 8] and g[20].kept_units(1, 8) == [20, 16, 8] and g[6].kept_units(1, 8) == [6]
    assert g[20].floor_units(9, 8) == 16 and g[12].floor_units(9, 8) == 12 and g[20].floor_units(0.5, 8) == 16
    assert [g[20].floor_units(k) for k in (1, 9)] == [1, 9]   # without rounding: the floor as it was

def test_floor_rounded_up():
    "`min_keep=3` with `round_to=8`: no pruned group keeps fewer than 8 channels, even at 90%"
    plan = plan_for('resnet18')
    plan.select(plan.l1_scores(), ratio=0.9, min_keep=3, round_to=8)
    assert min(g.n_keep for g in plan.groups) == 8 and rounded(plan, 8) == []
    plan.select(plan.l1_scores(), ratio=0.9, min_keep=3)
    assert min(g.n_keep for g in plan.groups) == 3

def test_per_group_and_global_share():
    plan = plan_for('resnet18')
    s = plan.l1_scores()
    select_per_group(plan, s, {'layer3': 0.5, 'layer4': 0.3}, round_to=16)
    assert rounded(plan, 16) == []
    touched = [g for g in plan.groups if g.n_keep < g.size]
    assert touched and all(g.name.startswith(('layer3', 'layer4')) for g in touched)
    assert {g.n_keep for g in touched if g.name.startswith('layer3')} == {128}    # 256 * 0.5, already a multiple
    assert {g.n_keep for g in touched if g.name.startswith('layer4')} == {352}    # 512 * 0.7 = 358.4: nearest multiple of 16
    plan.select(s, ratio=0.4, round_to=8)
    total = sum(g.size for g in plan.groups)
    assert abs(total - sum(g.n_keep for g in plan.groups) - round(0.4 * total)) <= 8

@pytest.mark.parametrize('r', [None, 1])
def test_round_to_one_changes_nothing(r):
    plan = plan_for('mobilenet_v2')
    s = plan.l1_scores()
    for kw in [dict(ratio=0.5), dict(target_macs=0.4), dict(ratio=0.3, scope='local')]:
        plan.select(s, **kw); a = [g.keep.clone() for g in plan.groups]
        plan.select(s, round_to=r, **kw)
        assert all(torch.equal(k, g.keep) for k, g in zip(a, plan.groups))

# ---------------------------------------------------------------- the MACs target still lands
@pytest.mark.parametrize('arch', ['resnet18', 'mobilenet_v2', 'resnet56'])
@pytest.mark.parametrize('target', [0.5, 0.25])
@pytest.mark.parametrize('r', [8, 16])
def test_target_macs_within_2_percent(arch, target, r):
    plan = plan_for(arch)
    if (arch, target, r) == ('resnet56', 0.25, 16):   # widths 16/32/64 rounded to 16: the floor is at 0.45 of the MACs
        with pytest.warns(UserWarning, match='out of reach'): plan.select(plan.l1_scores(), target_macs=target, round_to=r)
        assert all(g.n_keep == g.kept_units(1, r)[-1] * g.unit_width for g in plan.groups)
        return
    plan.select(plan.l1_scores(), target_macs=target, round_to=r)
    s = plan.summary()
    assert rounded(plan, r) == []
    assert abs(s.totals['macs_after'] / s.totals['macs_before'] - target) <= 0.02

@pytest.mark.parametrize('arch, target, r', [('resnet18', 0.1, 16), ('mobilenet_v2', 0.25, 8), ('resnext', 0.5, 16)])
def test_room_given_back_in_rounded_steps(arch, target, r):
    "Steps kept again under a MACs budget are whole rounded steps: widths stay multiples and the budget holds (resnet18: 0.961 of it before)"
    plan = plan_for(arch)
    plan.select(plan.l1_scores(), target_macs=target, round_to=r)
    t = plan.summary().totals
    assert rounded(plan, r) == []
    assert 0.98 * target <= t['macs_after'] / t['macs_before'] <= target

# ---------------------------------------------------------------- criteria, PruneCallback, learn.slim
@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64)

def fit(dls, epochs, cb, model=None):
    learn = Learner(dls, model or vgg_tiny(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 1e-2, cbs=cb)
    return learn

def test_criteria_prune_rounds(dls):
    plan = SlimPlan(vgg_tiny(), dls.one_batch()[0][:4], verify=False)
    L1Norm().prune(plan, ratio=0.3, round_to=8)      # local: 16, 32, 64 -> 8 (11.2 is nearer 8 than 16), 24, 40 (44.8)
    assert sorted(g.n_keep for g in plan.groups) == [8, 24, 48]
    L1Norm().prune(plan, ratio={'features.4': 0.5}, round_to=16)
    assert sorted(g.n_keep for g in plan.groups) == [16, 32, 32]
    get_criterion('thinet', n_batches=1).prune(plan, target_macs=0.5, dls=dls, round_to=8)
    assert rounded(plan, 8) == [] and any(g.n_keep < g.size for g in plan.groups)

@pytest.mark.parametrize('schedule,kw', [('iterative', dict(ratio=0.6, scope='local')), ('agp', dict(target_macs=0.3)),
                                         ('one-shot', dict(ratio=0.5, soft=True, scope='local', end=1.))])
def test_callback_rounds_every_step(dls, schedule, kw):
    seen = []
    class Spy(PruneCallback):
        def _prune_step(self, frac):
            super()._prune_step(frac)
            seen.append([(g.size, g.n_keep) for g in self.plan.groups])
    cb = Spy(criterion=lambda plan, dls: plan.l1_scores(), schedule=schedule, n_steps=3, round_to=8, compact_at_end=True, **kw)
    learn = fit(dls, 2, cb)
    assert len(seen) >= 2
    assert all(k % 8 == 0 or k == n for step in seen for n, k in step)
    assert len({tuple(s) for s in seen}) > 1 or kw.get('soft')   # the widths change from step to step
    convs = [m.out_channels for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [k for _, k in sorted(seen[-1], key=lambda t: t[0])] and all(c % 8 == 0 for c in convs)
    if 'target_macs' in kw:
        x = dls.one_batch()[0][:1]
        assert abs(count_macs(learn.model, x) / count_macs(vgg_tiny(), x) - 0.3) <= 0.02

def test_learn_slim_round_to(dls):
    "`learn.slim(..., round_to=8)` reaches `PruneCallback` (through `prune_kw`) and the deployed widths are multiples of 8"
    learn = Learner(dls, vgg_tiny(), metrics=accuracy)
    r = learn.slim('l1', target_macs=0.5, round_to=8, prune_epochs=0, finetune_epochs=1, measure_speed=False)
    convs = [m.out_channels for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs != [16, 32, 64] and all(c % 8 == 0 for c in convs)
    assert abs(1 / r.ratios()['macs'] - 0.5) <= 0.02

# ---------------------------------------------------------------- bad values fail before anything changes
BAD = [0, -8, 8.0, True, '8', 2.5]

@pytest.mark.parametrize('bad', BAD)
def test_bad_round_to(dls, bad):
    model = vgg_tiny()
    plan = SlimPlan(model, dls.one_batch()[0][:4], verify=False)
    plan.select(plan.l1_scores(), ratio=0.5)
    masks = [g.keep.clone() for g in plan.groups]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for f in [lambda: plan.select(plan.l1_scores(), ratio=0.2, round_to=bad),
              lambda: plan.select(plan.l1_scores(), target_macs=0.2, round_to=bad),
              lambda: select_per_group(plan, plan.l1_scores(), {'': 0.2}, round_to=bad),
              lambda: L1Norm().prune(plan, ratio=0.2, round_to=bad),
              lambda: PruneCallback(ratio=0.5, round_to=bad)]:
        with pytest.raises(ValueError, match='`round_to`'): f()
    assert all(torch.equal(m, g.keep) for m, g in zip(masks, plan.groups))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    learn = Learner(dls, vgg_tiny())
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='`round_to`'): learn.slim('l1', target_macs=0.5, round_to=bad, measure_speed=False)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())

def test_round_to_needs_channels():
    with pytest.raises(ValueError, match='`round_to`'): PruneCallback(ratio=0.5, criterion='magnitude', granularity='weight', round_to=8)

# ---------------------------------------------------------------- the report warns when speed falls short of MACs
def test_report_speed_warning():
    "Synthetic measurements (no timing): 4x fewer MACs but 1.25x faster at batch 32 warns and names `round_to`; 2.5x does not"
    dense = dict(params=10_000, macs=4_000_000, latency_1=1e-3, latency_32=20e-3)
    slow = dict(params=2_500, macs=1_000_000, latency_1=0.9e-3, latency_32=16e-3)
    with pytest.warns(UserWarning, match='round_to') as rec:
        r = SlimReport(dense, slow, widths={'0': (13, 32), '3': (24, 64), 'fc': (10, 10)})
    assert [str(w.message) for w in rec] == r.warnings and len(r.warnings) == 1
    assert '1.25x' in r.warnings[0] and '4.00x' in r.warnings[0] and '1 of the 2 pruned layer widths' in r.warnings[0]
    assert r.warnings[0] in repr(r) and r.to_dict()['warnings'] == r.warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')    # no warning is raised for these
        assert SlimReport(dense, {**slow, 'latency_32': 8e-3}).warnings == []
        assert SlimReport(dense, {**slow, 'latency_32': None}).warnings == []   # `measure_speed=False`
        assert speed_warning(dense, {**slow, 'macs': 4_000_000}) is None
        assert 'pruned layer widths' not in speed_warning(dense, slow, widths={'0': (16, 32)})   # every width a multiple
