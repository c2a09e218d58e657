"The plan: coupled groups, masks that stay masked, the floor, compaction equivalence, learner integration, persistence."
import copy, time
import pytest, torch, torchvision
from torch import nn
from fastai.learner import Learner
from fastai.optimizer import SGD as fSGD, Adam as fAdam, RAdam as fRAdam, Lamb as fLamb
from fastai.callback.training import GradientAccumulation
from fastslim.core import count_macs, count_params, eval_mode
from fastslim.data import digits_dls
from fastslim.plan import SlimPlan, save_slim, load_slim, plan_of
from fastslim.prune import MaskCallback   # also patches `Learner.compact`
from fastslim.test_utils import small_cnn, randomize_bn

def outputs_close(a, b, x, rtol=1e-5):
    with torch.no_grad(), eval_mode(a), eval_mode(b):
        ya, yb = a(x), b(x)
    return ((ya - yb).abs().max() / ya.abs().max()).item() <= rtol

# ---------------------------------------------------------------- equivalence on the reference architectures
ARCHS = {'vgg': lambda: torchvision.models.vgg11_bn(num_classes=10).features,  # VGG-style conv stack
         'resnet_basic': lambda: torchvision.models.resnet18(num_classes=10),
         'resnet_bottleneck': lambda: torchvision.models.resnet50(num_classes=10),
         'densenet': lambda: torchvision.models.DenseNet(growth_rate=12, block_config=(3, 3, 3), num_init_features=16, num_classes=10),
         'mobilenet': lambda: torchvision.models.mobilenet_v2(num_classes=10),
         'resnext': lambda: torchvision.models.resnext50_32x4d(num_classes=10)}

@pytest.mark.parametrize('arch', list(ARCHS))
@pytest.mark.parametrize('ratio', [0.3, 0.6])
def test_compact_equals_masked(arch, ratio):
    model = randomize_bn(ARCHS[arch]()).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = SlimPlan(model, x)
    plan.select(plan.l2_scores(), ratio=ratio).apply()
    small = plan.compact()
    assert count_params(small) < count_params(model)
    assert outputs_close(model, small, x)
    assert outputs_close(model, small, torch.randn(3, 3, 32, 32))

def test_grouped_conv_prunes_whole_positions():
    "ResNeXt's grouped convolutions force the same position in every conv group to go together"
    model = torchvision.models.resnext50_32x4d(num_classes=10)
    plan = SlimPlan(model, torch.randn(1, 3, 32, 32))
    tied = [g for g in plan.groups if g.period < g.size]
    assert tied
    plan.select(plan.l1_scores(), ratio=0.5)
    for g in tied:
        k = g.keep.view(-1, g.period)
        assert (k == k[0]).all()

def test_layernorm_model_compacts_and_runs():
    "LayerNorm/GroupNorm models compact and run (not equivalent: see the docs)"
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    plan = SlimPlan(model, x)
    plan.select(plan.l2_scores(), ratio=0.5).apply()
    small = plan.compact()
    assert small(x).shape == (1, 10)
    assert count_macs(small, x) < count_macs(model, x)

# ---------------------------------------------------------------- the floor
def test_global_threshold_never_empties_a_layer():
    "The Network Slimming crash (a global threshold removing all of a layer) cannot happen: the floor holds"
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = SlimPlan(model, x)
    victim = plan['layer1.0.conv1']
    bn = model.layer1[0].bn1
    with torch.no_grad(): bn.weight.fill_(1e-6)          # every scale of one layer below any global threshold
    scores = plan.bn_scores()
    thr = torch.cat(list(scores.values())).kthvalue(round(0.6 * sum(len(s) for s in scores.values()))).values
    assert (scores[victim.name] <= thr).all()             # the reference code would empty this layer
    plan.select(scores, ratio=0.6)
    assert victim.n_keep == 1
    plan.apply()
    small = plan.compact()
    assert small.layer1[0].conv1.out_channels == 1
    assert outputs_close(model, small, x)

@pytest.mark.parametrize('min_keep,expect', [(4, 4), (0.25, 4)])
def test_min_keep_count_and_fraction(min_keep, expect):
    model = small_cnn()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8), min_keep=min_keep)
    with torch.no_grad(): model[1].weight.fill_(1e-6)
    plan.select(plan.bn_scores(), ratio=0.7)
    assert plan['0'].n_keep == expect
    plan.select(plan.bn_scores(), ratio=0.7, scope='local')
    assert all(g.n_keep >= expect for g in plan.groups)

def test_local_removes_same_share_everywhere():
    model = small_cnn()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5, scope='local')
    assert [g.n_keep for g in plan.groups] == [g.size // 2 for g in plan.groups]

def test_global_removes_exact_share():
    model = torchvision.models.resnet18(num_classes=10)
    plan = SlimPlan(model, torch.randn(1, 3, 32, 32))
    plan.select(plan.l1_scores(), ratio=0.4)
    total = sum(g.size for g in plan.groups)
    assert sum(g.size - g.n_keep for g in plan.groups) == round(0.4 * total)

# ---------------------------------------------------------------- bad input, before any weight changes
def test_bad_input_changes_nothing():
    model = small_cnn()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    before = copy.deepcopy(model.state_dict())
    s = plan.l1_scores()
    for kw, word in [(dict(ratio=1.0), '`ratio`'), (dict(ratio=-0.1), '`ratio`'), (dict(ratio=0.5, target_macs=0.5), 'exactly one'),
                     (dict(), 'exactly one'), (dict(ratio=0.5, scope='nope'), '`scope`'),
                     (dict(ratio=0.5, min_keep=100), '`min_keep`'), (dict(target_macs=1.5), '`target_macs`')]:
        with pytest.raises(ValueError, match=word): plan.select(s, **kw)
    with pytest.raises(ValueError, match='`scores`'): plan.select({'nope': torch.ones(3)}, ratio=0.5)
    with pytest.raises(ValueError, match='shape'): plan.select({'0': torch.ones(3)}, ratio=0.5)
    with pytest.raises(ValueError, match='`ratio`'): plan.prune_weights(1.2)
    with pytest.raises(ValueError, match='`layers`'): plan.prune_weights(0.5, layers=['nope'])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match='`example`'): SlimPlan(small_cnn(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match='`ignored`'): SlimPlan(small_cnn(), torch.randn(2, 1, 8, 8), ignored=['nope'])
    with pytest.raises(ValueError, match='BatchNorm'):
        SlimPlan(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
                 torch.randn(1, 1, 8, 8)).bn_scores()

# ---------------------------------------------------------------- hard and soft masks through optimizers
def _train_steps(model, opt, x, y, n=5):
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()

TORCH_OPTS = {'sgd_momentum_wd': lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
              'adam': lambda ps: torch.optim.Adam(ps, lr=1e-2), 'adamw': lambda ps: torch.optim.AdamW(ps, lr=1e-2)}

@pytest.mark.parametrize('opt', list(TORCH_OPTS))
def test_hard_masks_stay_zero_torch_optimizers(opt):
    "Momentum built before masking, weight decay and Adam's moments cannot revive a masked weight"
    model = small_cnn(); x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    o = TORCH_OPTS[opt](model.parameters())
    _train_steps(model, o, x, y)                      # optimizer state exists before masking
    plan = SlimPlan(model, x)
    plan.select(plan.l1_scores(), ratio=0.5).prune_weights(0.3)
    hook = plan.attach(o)
    plan.apply(o)
    _train_steps(model, o, x, y)
    masks = plan.param_masks()
    assert all((p[r] == 0).all() for p, r in masks.items())
    for p, r in masks.items():
        for v in o.state[p].values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape: assert (v[r] == 0).all()
    hook.remove()

@pytest.mark.parametrize('opt_func', [fSGD, fAdam, fRAdam, fLamb], ids=['SGD', 'Adam', 'RAdam', 'Lamb'])
def test_hard_masks_stay_zero_fastai(opt_func):
    dls = digits_dls(bs=64)
    model = small_cnn()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, wd=1e-2)
    learn.fit(1, 1e-2)
    plan = SlimPlan(model, dls.one_batch()[0][:2])
    plan.select(plan.bn_scores(), ratio=0.5).prune_weights(0.3)
    learn.fit(1, 1e-2, cbs=[MaskCallback(plan), GradientAccumulation(128)])
    assert all((p[r] == 0).all() for p, r in plan.param_masks().items())
    assert all(p[~r].abs().sum() > 0 for p, r in plan.param_masks().items())

def test_soft_masks_regrow_until_reapplied():
    "Soft mode (Soft Filter Pruning): masked filters take updates between applications"
    dls = digits_dls(bs=64)
    model = small_cnn()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
    learn.fit(1, 1e-2)                              # trained BN shifts let gradients reach zeroed filters
    plan = SlimPlan(model, dls.one_batch()[0][:2], hard=False)
    plan.select(plan.l2_scores(), ratio=0.5)
    learn.fit(1, 1e-2, cbs=MaskCallback(plan))      # zeroes the filters once, then lets them regrow
    masks = plan.param_masks(filters_only=True)
    assert all((p[r] != 0).any() for p, r in masks.items() if p.ndim > 1)   # BN makes a conv bias gradient-free
    masks = plan.param_masks()
    plan.apply()
    assert all((p[r] == 0).all() for p, r in masks.items())

def test_masks_are_buffers_in_checkpoints():
    model = small_cnn()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5).prune_weights(0.2)
    sd = copy.deepcopy(model.state_dict())
    fresh = small_cnn()
    plan2 = SlimPlan(fresh, torch.randn(2, 1, 8, 8))
    fresh.load_state_dict(sd)                          # weight masks created by the load hook, channel masks by the plan
    assert [g.n_keep for g in plan2.groups] == [g.n_keep for g in plan.groups]
    assert sum(int(r.sum()) for r in plan2.param_masks().values()) == sum(int(r.sum()) for r in plan.param_masks().values())

# ---------------------------------------------------------------- learner integration
def test_learner_compact_rebuilds_optimizer_and_trains():
    dls = digits_dls(bs=64)
    model = small_cnn()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
    plan = SlimPlan(model, dls.one_batch()[0][:2])
    plan.select(plan.l1_scores(), ratio=0.5)
    learn.fit(1, 1e-2, cbs=MaskCallback(plan))
    small = learn.compact(plan)
    assert learn.model is small and count_params(small) < count_params(model)
    model_params = {id(p) for p in small.parameters()}
    opt_params = [p for pg in learn.opt.param_lists for p in pg]
    assert {id(p) for p in opt_params} == model_params
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    learn.fit(1, 1e-2)
    assert all(not torch.equal(before[n], p) for n, p in small.named_parameters())

# ---------------------------------------------------------------- persistence
def test_save_load_compact_bit_identical(tmp_path):
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = SlimPlan(model, x)
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    small = plan.compact()
    save_slim(small, tmp_path/'s.pt')
    d = torch.load(tmp_path/'s.pt', weights_only=True)        # no pickled classes
    assert d['kind'] == 'compact'
    back = load_slim(tmp_path/'s.pt', lambda: torchvision.models.resnet18(num_classes=10)).eval()
    with torch.no_grad(): assert torch.equal(small(x), back(x))

def test_save_load_masked_restores_masks(tmp_path):
    model = small_cnn()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5).prune_weights(0.25).apply()
    save_slim(model, tmp_path/'m.pt')
    back = load_slim(tmp_path/'m.pt', small_cnn)
    p2 = plan_of(back)
    assert [g.keep.tolist() for g in p2.groups] == [g.keep.tolist() for g in plan.groups]
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))

# ---------------------------------------------------------------- MACs budget and summary
@pytest.mark.parametrize('arch', ['resnet', 'vgg'])
@pytest.mark.parametrize('target', [0.5, 0.25])
def test_target_macs_within_2_percent(arch, target):
    model = (torchvision.models.resnet18(num_classes=10) if arch == 'resnet'
             else nn.Sequential(torchvision.models.vgg11_bn().features, nn.Flatten(), nn.Linear(512, 10)))
    x = torch.randn(1, 3, 32, 32)
    plan = SlimPlan(model, x)
    plan.select(plan.l1_scores(), target_macs=target)
    s = plan.summary()
    assert abs(s.totals['macs_after'] / s.totals['macs_before'] - target) <= 0.02

@pytest.mark.parametrize('seed', range(5))
def test_target_macs_leaves_no_room(seed):
    "The removal that crosses a MACs budget can land far below it; the walk keeps again what fits: re-adding any group's best removed channel exceeds it"
    from fastslim.models import CifarResNet
    torch.manual_seed(seed)
    model = randomize_bn(CifarResNet(depth=20, num_classes=10, in_channels=1, stem_width=8, stage_widths=[8, 16, 32]))
    plan = SlimPlan(model, torch.randn(2, 1, 28, 28), min_keep=0.1, verify=False)
    scores = plan.bn_scores()
    plan.select(scores, target_macs=0.1, verify=False)
    def macs(): t = plan.summary().totals; return t['macs_after'] / t['macs_before']
    assert 0.098 <= macs() <= 0.1   # before the walk gave back room, seeds 2-4 landed at 0.0964, 0.0967 and 0.0883
    for g in plan.groups:
        idx = (~g.keep).nonzero().flatten()
        if not len(idx): continue
        best = idx[scores[g.name][idx].argmax()]
        g.keep[best] = True
        assert macs() > 0.1, g.name
        g.keep[best] = False

def test_summary_counts():
    model = small_cnn()
    x = torch.randn(2, 1, 8, 8)
    plan = SlimPlan(model, x)
    plan.select(plan.l1_scores(), ratio=0.5, scope='local').prune_weights(0.5, layers=['3'])
    s = plan.summary()
    assert s.totals['params_before'] == count_params(model)
    assert s.totals['macs_after'] == count_macs(plan.compact(), x[:1]) < s.totals['macs_before']
    assert abs(s.sparsity['3'] - 0.5) < 0.01
    assert '0' in repr(s) and 'MACs' in repr(s)

# ---------------------------------------------------------------- robustness: never crash, never hang
import itertools, time, timm
import torch_pruning as tp
from fastslim.plan import tp_compat
from fastslim.plan.budget import Budget
from fastslim.plan.compact import Verifier
from fastslim.plan import PlanError, PlanTimeout, PlanMemoryError

def test_shufflenet_barrier_keeps_the_rest_equivalent():
    "torch-pruning can't map ShuffleNet's channel shuffle: groups crossing it are skipped, the branches still slim"
    model = randomize_bn(torchvision.models.shufflenet_v2_x0_5(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = SlimPlan(model, x)
    assert any('cannot map channels through the reshape' in r for r in plan.skipped.values())
    plan.select(plan.l2_scores(), ratio=0.5).apply()
    small = plan.compact()
    assert count_macs(small, x[:1]) < 0.8 * count_macs(model, x[:1])
    assert outputs_close(model, small, x) and outputs_close(model, small, torch.randn(2, 3, 32, 32))

def test_torch_pruning_itself_is_unchanged():
    "The index-mapping shim only acts inside fastslim's calls: torch-pruning used directly behaves as before"
    with pytest.raises(ZeroDivisionError):
        tp.DependencyGraph().build_dependency(torchvision.models.shufflenet_v2_x0_5(), torch.randn(1, 3, 32, 32), verbose=False)

def test_time_limit_interrupts_cleanly():
    model = torchvision.models.resnet18(num_classes=10)
    model.layer1.register_forward_hook(lambda *a: time.sleep(0.3))     # tracing runs past the limit, before any group
    hooks = [len(m._forward_hooks) for m in model.modules()]
    with pytest.raises(PlanTimeout, match='`time_limit`') as e: SlimPlan(model, torch.randn(1, 3, 32, 32), time_limit=0.1)
    assert isinstance(e.value, TimeoutError)
    assert [len(m._forward_hooks) for m in model.modules()] == hooks    # no tracing hook left behind
    assert model.training                                                # nor eval mode

def _state_hash(model):
    "A digest of every tensor of `model`'s state dict, its keys, and its hooks: equal digests, nothing changed"
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items(): h.update(k.encode()); h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._load_state_dict_pre_hooks) for m in model.modules())
    return h.hexdigest(), hooks, [m.training for m in model.modules()]

def test_memory_limit_interrupts_cleanly(monkeypatch):
    "Deterministic: resident memory is mocked past the limit once the build waits, whatever the machine's speed"
    orig, waited = tp_compat.build_graph, []
    # the budget's memory probe: the baseline until the build below is waiting, then far past any limit
    # (so a slow machine, whose graph build outlasts a poll, cannot be interrupted before the wait starts)
    monkeypatch.setattr(Budget, 'default_rss', lambda: 100. if waited else 0.)
    def build_then_wait(*a, **k):
        DG = orig(*a, **k)
        end = time.monotonic() + 60
        while time.monotonic() < end: time.sleep(0.01); waited.append(1)   # until the watchdog interrupts (no race)
        return DG
    monkeypatch.setattr(tp_compat, 'build_graph', build_then_wait)
    model = small_cnn()
    before = _state_hash(model)
    with pytest.raises(PlanMemoryError, match='`memory_limit`=2 GiB'):
        SlimPlan(model, torch.randn(2, 1, 8, 8), memory_limit=2)
    assert waited and len(waited) < 5000                                 # interrupted inside the build, long before 60 s
    assert plan_of(model) is None and _state_hash(model) == before       # no plan, no mask, no hook left behind

@pytest.mark.parametrize('kw', [dict(time_limit=0), dict(time_limit=-1), dict(memory_limit=0), dict(memory_limit='8')])
def test_bad_limits(kw):
    with pytest.raises(ValueError, match=f"`{list(kw)[0]}`"): SlimPlan(small_cnn(), torch.randn(2, 1, 8, 8), **kw)

def test_failing_group_is_skipped_not_fatal(monkeypatch):
    "An exception inside torch-pruning for one group skips that group, with the reason; the rest is planned"
    orig = tp.DependencyGraph.get_pruning_group
    def flaky(self, module, fn, idxs):
        if module is model[3]: raise IndexError('list index out of range')
        return orig(self, module, fn, idxs)
    monkeypatch.setattr(tp.DependencyGraph, 'get_pruning_group', flaky)
    model = small_cnn()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    assert [g.name for g in plan.groups] == ['0'] and 'IndexError' in plan.skipped['3']
    plan.select(plan.l1_scores(), ratio=0.5)
    assert plan['0'].n_keep == 8

def test_graph_that_cannot_be_built_is_one_clear_error(monkeypatch):
    def broken(self, *a, **k): raise KeyError('aten::weird_op')
    monkeypatch.setattr(tp.DependencyGraph, 'build_dependency', broken)
    with pytest.raises(PlanError, match="could not trace Sequential: KeyError: 'aten::weird_op'"):
        SlimPlan(small_cnn(), torch.randn(2, 1, 8, 8))

class ChannelMean(nn.Module):
    "Scales by the sigmoid of the channel mean (like spatial attention): zero channels still count in the mean"
    def forward(self, x): return x * x.mean(1, keepdim=True).sigmoid()

def chain(n=24, c=4, bad=(5,)):
    "A deep conv chain (tanh keeps zero channels zero and the signal alive) with channel means after layers `bad`"
    layers = [nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.Tanh()]
    for i in range(1, n):
        if i in bad: layers.append(ChannelMean())
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Tanh()]
    for m in layers:
        if isinstance(m, nn.Conv2d): nn.init.kaiming_normal_(m.weight, nonlinearity='tanh')
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))

def test_verify_bisects_instead_of_checking_every_group(monkeypatch):
    model = chain().eval()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    calls = []
    orig = Verifier.check
    monkeypatch.setattr(Verifier, 'check', lambda self, *a: calls.append(1) or orig(self, *a))
    plan.select(plan.l1_scores(), ratio=0.5, scope='local')
    bad = [g for g in plan.skipped]
    assert bad == [str(3 * 4)]                                       # the conv before the channel mean, only
    assert len(plan.groups) == 23 and all(g.n_keep == 2 for g in plan.groups)
    assert len(calls) <= 13 < 24                                     # about 2 log2(24) checks, not one per group
    plan.apply()
    assert outputs_close(model, plan.compact(), torch.randn(2, 1, 8, 8))

def test_verify_off_checks_nothing(monkeypatch):
    monkeypatch.setattr(Verifier, 'check', lambda *a: pytest.fail('checked'))
    plan = SlimPlan(chain(6), torch.randn(2, 1, 8, 8), verify=False)
    plan.select(plan.l1_scores(), ratio=0.5)
    plan2 = SlimPlan(chain(6), torch.randn(2, 1, 8, 8))
    plan2.select(plan2.l1_scores(), ratio=0.5, verify=False)

def test_reselects_after_skipping_to_keep_the_ratio():
    model = chain(8, 8, bad=(2,)).eval()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5)
    assert list(plan.skipped) == ['3']
    total = sum(g.size for g in plan.groups)
    assert sum(g.size - g.n_keep for g in plan.groups) == round(0.5 * total)

def test_skipped_groups_survive_save_load(tmp_path):
    model = chain(6, bad=(2,))
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    save_slim(model, tmp_path/'m.pt')
    back = plan_of(load_slim(tmp_path/'m.pt', lambda: chain(6, bad=(2,))))
    assert back.skipped == plan.skipped and [g.name for g in back.groups] == [g.name for g in plan.groups]

class WithAux(nn.Module):
    "An auxiliary head that only runs in training mode (GoogLeNet, Inception v3)"
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head, self.aux = nn.Linear(8, 3), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    def forward(self, x):
        h = self.a(x); y = self.head(self.b(h))
        return (y, self.aux(h)) if self.training else y

def test_training_only_heads_are_pruned_consistently():
    model = randomize_bn(WithAux())
    x = torch.randn(2, 1, 8, 8)
    plan = SlimPlan(model, x)
    assert model.training and {g.name for g in plan.groups} == {'a.0', 'b.0'}   # the aux logits are outputs
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    small = plan.compact()
    assert small.a[0].out_channels == small.aux[2].in_features < 8
    assert outputs_close(model, small, x)
    y, aux = small.train()(x)
    assert y.shape == aux.shape == (2, 3)

def test_vit_slims_mlp_widths_not_heads():
    "ViT attention is left alone (with the reason); the MLP hidden widths slim, and stay exactly equivalent"
    model = timm.create_model('test_vit', pretrained=False, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = SlimPlan(model, x)
    assert plan.verify_mode == 'runs' and 'attention: heads not pruned' in plan.skipped.values()
    assert plan.groups and all(g.name.endswith('mlp.fc1') for g in plan.groups)
    plan.select(plan.l2_scores(), ratio=0.5).apply()
    small = plan.compact()
    assert count_macs(small, x[:1]) < count_macs(model, x[:1])
    assert small.blocks[0].attn.qkv.out_features == model.blocks[0].attn.qkv.out_features
    assert outputs_close(model, small, x)

class SlowTrace(nn.Module):
    "Its second forward (torch-pruning's trace) is slow: the interrupt lands where torch-pruning has a bare `except:`"
    def __init__(self): super().__init__(); self.c, self.h, self.n = nn.Conv2d(1, 4, 3), nn.Linear(4, 2), 0
    def forward(self, x):
        self.n += 1
        if self.n == 3: time.sleep(1.)   # the trace: after the probes in eval and in training mode
        return self.h(self.c(x).mean((2, 3)))

def test_interrupt_swallowed_by_torch_pruning_still_times_out():
    model = SlowTrace().eval()
    with pytest.raises(PlanTimeout, match='while tracing the model'): SlimPlan(model, torch.randn(2, 1, 8, 8), time_limit=0.3)
    assert model.n == 4          # torch-pruning caught the interrupt and ran the model again; the plan still stopped

@pytest.mark.parametrize('layer', [nn.Conv2d(6, 8, 3), nn.Conv2d(6, 8, 3, groups=2), nn.Conv2d(6, 6, 3, groups=6),
                                   nn.ConvTranspose2d(6, 8, 3), nn.Linear(6, 8), nn.BatchNorm2d(6), nn.LayerNorm(6),
                                   nn.GroupNorm(2, 6), nn.InstanceNorm2d(6, affine=True), nn.PReLU(6)])
def test_recorded_masks_equal_probed_masks(layer, monkeypatch):
    "The fast path (torch-pruning's own handlers, recorded) removes exactly what the index probes say it removes"
    import torch_pruning as tp
    from fastslim.plan.tp_compat import probe_removed, recorded
    pruner = tp.pruner.function.PrunerBox[tp.ops.module2type(layer)]
    for h in {pruner.prune_out_channels, pruner.prune_in_channels}:
        idxs = [0, 3] if h.__name__ == 'prune_out_channels' or not isinstance(layer, nn.Conv2d) or layer.groups == 1 else [0]
        fast = probe_removed(layer, h, idxs)
        assert recorded(layer, h, idxs, dict(layer.named_parameters())) is not None   # the fast path was taken
        slow = probe_removed(layer, h, idxs, fast=False)                               # the probes only
        assert fast.keys() == slow.keys() and fast
        for n in fast: assert torch.equal(fast[n], slow[n]), n

class _CachingNet(nn.Module):
    "Caches a tensor computed from a parameter with autograd on, as timm's LeViT/EfficientFormer attention biases do"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.scale = nn.Parameter(torch.ones(4)); self.cache = {}
    def forward(self, x):
        if 's' not in self.cache: self.cache['s'] = self.scale * 2   # non-leaf: copy.deepcopy refuses it
        return self.body(x) * self.cache['s'].view(1, -1, 1, 1)

def test_compact_copies_models_with_autograd_caches():
    model = _CachingNet().eval()
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError): copy.deepcopy(model)
    plan = SlimPlan(model, torch.randn(2, 3, 8, 8))
    plan.select(plan.l2_scores(), ratio=0.5)
    small = plan.compact()
    assert small.body[0].out_channels == 4 and torch.equal(small.cache['s'], model.cache['s'].detach())

class _TokenNet(nn.Module):
    "Passes a parameter between modules inside a tuple, as timm's PiT does (torch's module tracker fails on it)"
    class Stage(nn.Module):
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(4, 4, 3, padding=1)
        def forward(self, xt): x, t = xt; return self.conv(x) + t[..., None, None], t
    def __init__(self):
        super().__init__()
        self.stem, self.tok, self.stages = nn.Conv2d(3, 4, 1), nn.Parameter(torch.zeros(4)), nn.Sequential(self.Stage(), self.Stage())
    def forward(self, x): return self.stages((self.stem(x), self.tok.expand(x.shape[0], -1)))[0]   # a view of a parameter

def test_count_macs_with_parameters_between_modules():
    m = _TokenNet()
    assert count_macs(m, torch.randn(1, 3, 8, 8)) == 8*8*4*3 + 2 * 8*8*4*4*9

class _FixedBatch(nn.Module):
    "Runs only on batches of exactly 2 (a reshape with the batch size written in): the self-check can't join inputs"
    def __init__(self):
        super().__init__(); self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
    def forward(self, x): return self.head(self.bn(self.conv(x))).reshape(2, -1)

def test_self_check_falls_back_to_one_input_at_a_time():
    model = randomize_bn(_FixedBatch()).eval()
    plan = SlimPlan(model, torch.randn(2, 3, 8, 8))
    plan.select(plan.l2_scores(), ratio=0.5)    # verify='equal' by default: runs the check
    assert plan['conv'].n_keep == 4 and not plan.skipped
    assert plan.verify(fix=False)
