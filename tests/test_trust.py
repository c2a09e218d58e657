"Trust (issue #16): the self-check cannot be fooled or switched off by bad input, errors come before damage, and checkpoints loaded later never undo pruning."
import copy, hashlib, io, math, os
import numpy as np, pytest, torch, torchvision
from torch import nn
from fastai.learner import Learner
from fastai.callback.tracker import SaveModelCallback
from fastslim.data import digits_dls
from fastslim.plan import SlimPlan, save_slim, load_slim, plan_of
import fastslim.plan.compact as P
from fastslim import test_utils
from fastslim.test_utils import randomize_bn, state_hash

def small_cnn(c=8): return test_utils.small_cnn(c)   # the models of this file are 8 channels wide by default

def outs(model, x, train):
    "Output tensors on a copy (training mode updates BN statistics), dropout off (it draws other numbers for other widths)"
    m = copy.deepcopy(model).train(train)
    for d in m.modules():
        if isinstance(d, nn.modules.dropout._DropoutNd): d.eval()
    with torch.no_grad(): y = m(x)
    return [t for t in (y if isinstance(y, tuple) else (y,)) if isinstance(t, torch.Tensor)]

def rel(a, b): return max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b))

# ---------------------------------------------------------------- auxiliary heads: planned in eval mode, right in both
@pytest.mark.parametrize('arch,size', [('googlenet', 75), pytest.param('inception_v3', 299, marks=pytest.mark.slow)])   # 8 s: slow
def test_aux_heads_planned_in_eval_mode_compact_for_training_mode(arch, size):
    model = randomize_bn(torchvision.models.get_model(arch, aux_logits=True, init_weights=False, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size)
    plan = SlimPlan(model, x)                                            # eval mode: the aux heads do not run
    plan.select(plan.l1_scores(), ratio=0.5, min_keep=0.1).apply()
    assert not model.training and sum(g.size - g.n_keep for g in plan.groups) > 0
    small = plan.compact()
    assert {n for n, m in small.named_modules() if 'aux' in n.lower() and isinstance(m, nn.Conv2d) and m.in_channels < 
            dict(model.named_modules())[n].in_channels}                  # the aux heads' inputs were compacted too
    x2 = torch.randn(2, 3, size, size)
    for train in (False, True):                                         # was: crash in training mode (512 channels)
        a, b = outs(model, x2, train), outs(small, x2, train)
        assert [t.shape for t in a] == [t.shape for t in b] and len(a) == (3 if arch == 'googlenet' and train else 2 if train else 1)
        assert rel(a, b) < 1e-4

# ---------------------------------------------------------------- the check: several inputs, both modes, bad input refused
def test_check_compares_the_example_and_random_batches_at_its_scale_in_both_modes(monkeypatch):
    model = randomize_bn(small_cnn()).eval()
    x = torch.randn(2, 1, 8, 8) * 0.01 + 100.                           # unnormalised pixels: far from N(0, 1)
    plan = SlimPlan(model, x)
    seen, orig = [], SlimPlan.compact
    def compact(self):
        small = orig(self)
        small.register_forward_pre_hook(lambda m, i: seen.append((m.training, i[0].clone())))
        return small
    monkeypatch.setattr(SlimPlan, 'compact', compact)
    plan.select(plan.l1_scores(), ratio=0.5)
    assert {t for t, _ in seen} == {False, True}                         # eval and training mode, whatever the plan's mode
    xs = seen[0][1]
    assert len(xs) >= 3 * len(x) and torch.equal(xs[:2], x)              # the example and >= 2 random batches
    rnd = xs[2:]
    assert not torch.equal(rnd[:2], x) and abs(rnd.mean().item() - 100) < 0.01 and 0.005 < rnd.std().item() < 0.02

def test_check_is_fooled_by_no_nan():
    nan, inf = float('nan'), float('inf')
    assert P._rel_diff([torch.tensor([1., nan])], [torch.tensor([1., 2.])]) == math.inf           # was: nan, which passed
    assert P._rel_diff([torch.tensor([1., 2.])], [torch.tensor([1., inf])]) == math.inf
    assert P._rel_diff([torch.tensor([1., nan])], [torch.tensor([1., nan])]) == 0.               # the same NaN: no difference
    assert not P._close([torch.tensor([nan])], [torch.tensor([0.])], 1e-4)

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_example_with_nan_or_inf_is_refused(bad):
    model = small_cnn(); before = state_hash(model)
    x = torch.randn(2, 1, 8, 8); x[1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match='`example` holds NaN or inf'): SlimPlan(model, x)
    assert plan_of(model) is None and state_hash(model) == before

@pytest.mark.parametrize('rtol', [-1, 0, float('nan'), float('inf'), '1e-4', True])
def test_bad_rtol_and_fix_are_errors_before_any_change(rtol):
    model = randomize_bn(small_cnn()).eval()
    with pytest.raises(ValueError, match='`rtol`'): SlimPlan(small_cnn(), torch.randn(2, 1, 8, 8), rtol=rtol)
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    kept, before = [g.keep.clone() for g in plan.groups], state_hash(model)
    with pytest.raises(ValueError, match='`rtol`'): plan.verify(rtol=rtol)    # rtol=-1 was: every group un-pruned, True
    with pytest.raises(ValueError, match='`fix`'): plan.verify(fix='yes')
    assert state_hash(model) == before and all(torch.equal(k, g.keep) for k, g in zip(kept, plan.groups)) and not plan.skipped
    assert plan.verify(fix=False)

@pytest.mark.parametrize('make,kw,word', [(lambda: None, {}, '`model`'), (small_cnn, dict(min_keep=float('nan')), '`min_keep`'),
                                          (small_cnn, dict(min_keep=float('inf')), '`min_keep`'), (small_cnn, dict(hard='no'), '`hard`'),
                                          (small_cnn, dict(example=None), '`example`'), (small_cnn, dict(example=[1, 2]), '`example`')])
def test_slimplan_bad_arguments(make, kw, word):
    model = make(); before = state_hash(model) if model is not None else None
    with pytest.raises(ValueError, match=word): SlimPlan(model, kw.pop('example', torch.randn(2, 1, 8, 8)), **kw)
    if model is not None: assert plan_of(model) is None and state_hash(model) == before

def test_select_empty_scores_and_prune_weights_wrong_shape_are_errors():
    model = small_cnn()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    before = state_hash(model)
    with pytest.raises(ValueError, match='`scores` is empty: nothing to prune'): plan.select({}, ratio=0.5)   # was: pruned nothing
    with pytest.raises(ValueError, match='`scores` must be a dict'): plan.select([1, 2], ratio=0.5)
    w = model[3].weight
    for s in (torch.ones(w.shape[0]), torch.ones(w.shape[1:]), torch.ones(2, *w.shape), torch.ones(w.shape).T):  # were broadcast
        with pytest.raises(ValueError, match=r"`scores\['3'\]` must have the weight's shape"): plan.prune_weights(0.5, scores={'3': s})
    with pytest.raises(ValueError, match='non-finite'): plan.prune_weights(0.5, scores={'3': torch.full(w.shape, float('nan'))})
    with pytest.raises(ValueError, match='not pruned here'): plan.prune_weights(0.5, scores={'8': torch.ones(10, 16)})
    assert state_hash(model) == before and not any(hasattr(m, 'slim_weight_mask') for m in model.modules())
    plan.prune_weights(0.5, scores={'3': torch.rand(w.shape)})           # the right shape still works
    assert 0.3 < (~model[3].slim_weight_mask).float().mean() < 0.7

# ---------------------------------------------------------------- checkpoints: SaveModelCallback, damaged files, atomic writes
def test_save_model_callback_does_not_undo_iterative_pruning(tmp_path):
    "fastai's SaveModelCallback reloads a checkpoint from before the last pruning step: the later masks survive it"
    from fastslim.prune import PruneCallback
    torch.manual_seed(0)
    learn = Learner(digits_dls(bs=128), small_cnn(16), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    prune = PruneCallback(ratio=0.6, schedule='iterative', n_steps=3, start=0., end=0.75)
    first = SaveModelCallback(monitor='valid_loss', comp=lambda a, b: b == -math.inf, fname='first')  # keeps epoch 0 only
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2, cbs=[prune, first])
    plan, final = prune.plan, prune.log[-1]['kept']
    assert len(prune.log) == 3 and prune.log[0]['kept'] > final                  # epoch 0's checkpoint kept more channels
    assert (tmp_path/'models'/'first.pth').is_file()                            # and it was reloaded at the end of fit
    assert sum(g.n_keep for g in plan.groups) == final                           # was: the epoch-0 masks (more channels)
    for p, r in plan.param_masks().items(): assert not p.detach()[r].any()       # the masked weights are zero again
    small = plan.compact()
    x = next(iter(learn.dls.valid))[0][:8]
    with torch.no_grad(): assert torch.allclose(learn.model.eval()(x), small.eval()(x), atol=1e-5)

def test_loading_an_older_state_dict_keeps_the_stricter_mask_only_while_hard():
    model = randomize_bn(small_cnn()).eval()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.25).apply()
    old = copy.deepcopy(model.state_dict())
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    kept = [g.keep.clone() for g in plan.groups]
    model.load_state_dict(old)
    assert all(torch.equal(k, g.keep) for k, g in zip(kept, plan.groups))
    assert all(not p.detach()[r].any() for p, r in plan.param_masks().items())
    plan.hard = False                                                     # soft masks: the checkpoint is loaded as it is
    model.load_state_dict(old)
    assert sum(g.n_keep for g in plan.groups) > sum(int(k.sum()) for k in kept)

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp('slim')
    torch.manual_seed(0)
    model = randomize_bn(small_cnn()).eval()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    save_slim(model, d/'masked.pt'); save_slim(plan.compact(), d/'compact.pt')
    return d

def _damage(d, case):
    "Write the damaged file of `case` into `d`; return (path, model_fn)"
    p, good = d/f'{case}.pt', d/'masked.pt'
    raw = good.read_bytes()
    def edit(f, src='masked.pt'):
        c = torch.load(d/src, weights_only=True); f(c); torch.save(c, p)
    def drop_key(c): del c['state_dict'][next(k for k in c['state_dict'] if k.endswith('3.weight'))]
    def all_false(c): k = next(k for k in c['state_dict'] if k.endswith('slim_keep')); c['state_dict'][k] = torch.zeros_like(c['state_dict'][k])
    def bad_hist(c): c['history'] = [['nope', [0, 1]]]
    def big_idx(c): c['history'] = [[c['history'][0][0], [999]]]
    writers = {
        'truncated': lambda: p.write_bytes(raw[:len(raw) // 2]), 'random_bytes': lambda: p.write_bytes(os.urandom(4096)),
        'text': lambda: p.write_text('not a checkpoint\n' * 20), 'empty': lambda: p.write_bytes(b''),
        'utf8_garbage': lambda: p.write_bytes('ünïcödé ✓'.encode() * 50), 'json': lambda: p.write_text('{"format": "fastslim-slim-1"}'),
        'pickled_model': lambda: torch.save(small_cnn(), p), 'list': lambda: torch.save([1, 2, 3], p),
        'plain_state_dict': lambda: torch.save(small_cnn().state_dict(), p),
        'wrong_format': lambda: edit(lambda c: c.update(format='fastslim-slim-0')), 'no_format': lambda: edit(lambda c: c.pop('format')),
        'wrong_kind': lambda: edit(lambda c: c.update(kind='sparse')), 'no_state_dict': lambda: edit(lambda c: c.pop('state_dict')),
        'bad_history': lambda: edit(lambda c: c.update(history='abc')), 'bad_example_shape': lambda: edit(lambda c: c.update(example_shape='x')),
        'mask_all_false': lambda: edit(all_false), 'missing_key': lambda: edit(drop_key),
        'history_of_unknown_layer': lambda: edit(bad_hist, 'compact.pt'), 'history_index_out_of_range': lambda: edit(big_idx, 'compact.pt'),
        'directory': lambda: p.mkdir(), 'missing_file': lambda: None,
    }
    writers[case]()
    return p, (lambda: small_cnn())

ARCH_CASES = {'other_architecture': lambda: small_cnn(12), 'other_head': lambda: nn.Sequential(*small_cnn()[:-1], nn.Linear(16, 3)),
              'not_a_module': lambda: 'resnet18'}
DAMAGE = ['truncated', 'random_bytes', 'text', 'empty', 'utf8_garbage', 'json', 'pickled_model', 'list', 'plain_state_dict',
          'wrong_format', 'no_format', 'wrong_kind', 'no_state_dict', 'bad_history', 'bad_example_shape', 'mask_all_false',
          'missing_key', 'history_of_unknown_layer', 'history_index_out_of_range', 'directory', 'missing_file']

@pytest.mark.parametrize('case', DAMAGE + list(ARCH_CASES))
def test_load_slim_damaged_or_mismatched_is_one_clear_error(saved, case):
    if case in ARCH_CASES: path, fn = saved/('compact.pt' if case == 'other_head' else 'masked.pt'), ARCH_CASES[case]
    else: path, fn = _damage(saved, case)
    with pytest.raises(ValueError) as e: load_slim(path, fn)
    msg = str(e.value)
    assert str(path) in msg or '`path`' in msg or '`model_fn`' in msg, msg    # names the file (or the parameter)
    assert len(msg) < 700 and '\n' not in msg, msg                             # one line, not a load_state_dict dump
    words = {'mask_all_false': 'keeps no entry', 'missing_key': 'missing keys', 'other_architecture': 'another shape',
             'wrong_format': 'format', 'not_a_module': 'nn.Module', 'history_of_unknown_layer': 're-applying its pruning'}
    if case in words: assert words[case] in msg, msg

def test_load_slim_still_loads_good_files(saved):
    for f in ('masked.pt', 'compact.pt'): assert isinstance(load_slim(saved/f, small_cnn), nn.Module)

def test_save_slim_is_atomic(tmp_path, monkeypatch):
    model = small_cnn()
    path = tmp_path/'slim.pt'
    path.write_bytes(b'the user file')
    def broken(obj, f, *a, **k):
        open(f, 'wb').write(b'half'); raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken)
    with pytest.raises(OSError, match='disk full'): save_slim(model, path)
    assert path.read_bytes() == b'the user file' and os.listdir(tmp_path) == ['slim.pt']
    monkeypatch.undo()
    save_slim(model, path)
    assert os.listdir(tmp_path) == ['slim.pt'] and isinstance(load_slim(path, small_cnn), nn.Module)
    with pytest.raises(ValueError, match='folder that does not exist'): save_slim(model, tmp_path/'no'/'slim.pt')

def test_masked_model_with_load_hooks_still_pickles():
    "The hooks that keep later masks are picklable (`learn.export`), and inert in the unpickled copy"
    model = randomize_bn(small_cnn()).eval()
    plan = SlimPlan(model, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    f = io.BytesIO(); torch.save(model, f); f.seek(0)
    copy_ = torch.load(f, weights_only=False)
    dense = {k: torch.ones_like(v) if k.endswith('slim_keep') else v for k, v in model.state_dict().items()}
    copy_.load_state_dict(dense)                                          # no live plan there: loaded as it is
    assert all(v.all() for k, v in copy_.state_dict().items() if k.endswith('slim_keep'))
