"DistillCallback: loss values on hand-made tensors, a frozen teacher, training-only loss, fastai integration on digits."
import copy, math, warnings
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation
from fastai.callback.schedule import *  # fit_one_cycle
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed, params
from fastslim.data import digits_dls
from fastslim.distill import *
from fastslim.test_utils import quiet_fit, state_of, same_state

# ---------------------------------------------------------------- losses on hand-made tensors

def np_softmax(z):
    e = np.exp(z - z.max()); return e / e.sum()

def np_kl(p, q): return float(np.sum(p * np.log(p / q)))

def test_kd_loss_value():
    s, t, T = np.array([1., 2., 0.5]), np.array([2., 0.5, 1.]), 3.
    want = T**2 * np_kl(np_softmax(t/T), np_softmax(s/T))
    got = kd_loss(torch.tensor(s)[None], torch.tensor(t)[None], T=T)
    assert abs(float(got) - want) < 1e-5
    z = torch.randn(5, 7)
    assert float(kd_loss(z, z.clone())) == pytest.approx(0, abs=1e-6)
    assert float(kd_loss(z, torch.randn(5, 7))) > 0

def test_kd_loss_spatial_logits():
    "(N, C, H, W) logits are N*H*W samples of C classes"
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(kd_loss(s, t), kd_loss(flat(s), flat(t)))

def dkd_by_hand(s, t, y, alpha, beta, T):
    "Zhao et al.'s definition, written out with numpy for one sample"
    ps, pt = np_softmax(s/T), np_softmax(t/T)
    bs, bt = np.array([ps[y], 1-ps[y]]), np.array([pt[y], 1-pt[y]])
    keep = [i for i in range(len(s)) if i != y]
    hs, ht = ps[keep]/ps[keep].sum(), pt[keep]/pt[keep].sum()
    return T**2 * (alpha*np_kl(bt, bs) + beta*np_kl(ht, hs))

def test_dkd_three_classes():
    s1, t1, s2, t2 = [np.array(o) for o in ([1., 2., .5], [2., .5, 1.], [-1., 0., 3.], [0.5, 0.2, 2.])]
    y, a, b, T = [1, 2], 1.5, 0.7, 2.
    want = (dkd_by_hand(s1, t1, y[0], a, b, T) + dkd_by_hand(s2, t2, y[1], a, b, T)) / 2
    S, Tt = torch.tensor(np.stack([s1, s2])), torch.tensor(np.stack([t1, t2]))
    got = dkd_loss(S, Tt, torch.tensor(y), alpha=a, beta=b, T=T)
    assert abs(float(got) - want) < 1e-5
    # soft targets use their argmax
    soft = F.one_hot(torch.tensor(y), 3).float()*0.8 + 0.1
    assert torch.allclose(got, dkd_loss(S, Tt, soft, a, b, T))
    z = torch.randn(4, 3)
    assert float(dkd_loss(z, z.clone(), torch.tensor([0, 1, 2, 0]))) == pytest.approx(0, abs=1e-6)

def test_at_loss_by_hand():
    "One channel, 2x2: two one-hot maps normalise to e1 and e2, so the squared difference is 2 over 4 positions"
    a, b = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0], b[0, 0, 0, 1] = 3., -5.
    assert float(at_loss(a, b)) == pytest.approx(2/4)
    f = torch.randn(3, 4, 5, 5)
    assert float(at_loss(f, f)) == pytest.approx(0, abs=1e-8)
    assert torch.allclose(attention_map(f), F.normalize((f**2).sum(1).flatten(1), dim=1), atol=1e-6)

@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 100.), st.floats(0.01, 100.), st.integers(1, 6), st.integers(1, 6))
def test_at_and_sp_are_scale_invariant(c1, c2, cs, ct):
    g = torch.Generator().manual_seed(cs*7 + ct)
    fs, ft = torch.randn(4, cs, 3, 3, generator=g), torch.randn(4, ct, 3, 3, generator=g)
    assert torch.allclose(at_loss(c1*fs, c2*ft), at_loss(fs, ft), atol=1e-6)
    assert torch.allclose(sp_loss(c1*fs, c2*ft), sp_loss(fs, ft), atol=1e-6)
    assert float(at_loss(c1*fs, fs)) == pytest.approx(0, abs=1e-6)

def test_sp_loss_by_hand():
    fs, ft = np.random.default_rng(0).normal(size=(2, 3, 4, 4, 4))
    def G(f):
        f = f.reshape(len(f), -1); g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    want = np.sum((G(fs) - G(ft))**2) / 3**2
    assert float(sp_loss(torch.tensor(fs), torch.tensor(ft))) == pytest.approx(want, rel=1e-5)
    assert float(sp_loss(torch.tensor(fs), torch.randn(3, 2))) > 0   # any shapes, same batch

# ---------------------------------------------------------------- training on digits

def cnn(w):
    return nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(w, 2*w, 3, padding=1), nn.BatchNorm2d(2*w), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8*w, 10))

def learner(model, cbs=None, **kw):
    return Learner(digits_dls(bs=64), model, CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs, **kw)

@pytest.fixture(scope='module')
def teacher():
    set_seed(0)
    return quiet_fit(learner(cnn(16)), 3).model.eval()


@pytest.mark.parametrize('loss', ['kd', 'dkd'])
def test_student_learns(teacher, loss):
    set_seed(1)
    t0 = state_of(teacher)
    learn = quiet_fit(learner(cnn(8), DistillCallback(teacher, loss=loss, T=2., alpha=0.5)), 3)
    assert learn.validate()[1] > 0.8           # chance is 0.1
    assert same_state(state_of(teacher), t0)

class Capture(Callback):
    "Record what the learner holds after the loss, at a chosen order"
    def __init__(self, order): self.order, self.rows = order, []
    def after_loss(self):
        if self.training:
            self.rows.append(dict(loss=self.learn.loss.detach().clone(), loss_grad=self.learn.loss_grad.detach().clone(),
                                  pred=self.learn.pred.detach().clone(), xb=self.learn.xb[0].clone(), yb=self.learn.yb[0].clone()))

def test_training_loss_only(teacher):
    "Same weights, lr=0: validation loss and metrics are identical with and without the callback, train loss is not"
    set_seed(3)
    init = cnn(4).state_dict()
    runs = {}
    for name, cbs in [('plain', None), ('kd', [DistillCallback(teacher, T=3., alpha=0.3, features=['6'],
                                                               feature_loss={'sp': 100.}), Capture(20)])]:
        m = cnn(4); m.load_state_dict(init)
        set_seed(8)                              # fastai seeds each DataLoader's shuffling from `random`
        learn = learner(m, cbs)
        before = learn.validate()
        quiet_fit(learn, 1, lr=0., one_cycle=False)
        runs[name] = (learn, before, learn.recorder.values[-1], learn.validate())
    (lp, bp, rp, vp), (lk, bk, rk, vk) = runs['plain'], runs['kd']
    assert bp == bk and vp == vk                 # learn.validate() outside and after the fit
    assert rp[1:] == rk[1:]                      # valid_loss and accuracy recorded during the fit
    assert rp[0] != pytest.approx(rk[0], rel=1e-3)  # train loss includes the distillation terms
    # the recorded loss of a batch is (1-alpha)*CE + alpha*T²KL + w*sp, computed here independently
    row = lk.capture.rows[-1]
    with torch.no_grad(): t = teacher(row['xb'])
    ps, pt = F.log_softmax(row['pred']/3., 1), F.log_softmax(t/3., 1)
    kd = 9. * (pt.exp()*(pt - ps)).sum(1).mean()
    cb = lk.distill
    want = 0.7*F.cross_entropy(row['pred'], row['yb']) + 0.3*kd + 100.*cb.last['sp:6']
    assert float(row['loss']) == pytest.approx(float(want), rel=1e-4)
    assert float(cb.last['logits']) == pytest.approx(float(kd), rel=1e-4)

def test_teacher_frozen_and_fitnet_adapter(teacher):
    "A fresh teacher module: never gets grads or changes; the FitNet adapter (8 -> 32 channels) is trained"
    set_seed(4)
    tm = cnn(16); tm.load_state_dict(teacher.state_dict())
    t0, student = state_of(tm), cnn(4)
    s0 = state_of(student)
    cb = DistillCallback(tm, alpha=0.5, features={'6': '6', '2': '2'}, feature_loss={'fitnet': 1., 'at': None})
    learn = learner(student, cb, splitter=lambda m: [params(m[:4]), params(m[4:])])
    n_opt = lambda: sum(len(g) for g in learn.opt.param_lists)
    quiet_fit(learn, 1, lr=slice(1e-3, 3e-2))    # two parameter groups, discriminative learning rates
    assert isinstance(cb.adapters[0], nn.Conv2d) and cb.adapters[0].weight.shape == (32, 8, 1, 1)
    assert isinstance(cb.adapters[1], nn.Conv2d) and cb.adapters[1].weight.shape == (16, 4, 1, 1)
    a0 = [p.detach().clone() for p in cb.adapters.parameters()]
    assert same_state(state_of(tm), t0)
    assert all(p.grad is None and not p.requires_grad for p in tm.parameters()) and not tm.training
    assert state_of(student).keys() == s0.keys() and not same_state(state_of(student), s0)   # student trained, nothing added
    assert n_opt() == len(list(student.parameters()))                            # adapters left the optimizer
    assert all(not m._forward_hooks for m in list(student.modules()) + list(tm.modules()))
    assert {'fitnet:6', 'fitnet:2', 'at:6', 'at:2', 'logits', 'task'} == set(cb.last)
    quiet_fit(learn, 1)                                                          # a second fit reuses them
    assert all(not torch.equal(p, q) for p, q in zip(cb.adapters.parameters(), a0))
    assert n_opt() == len(list(student.parameters()))
    assert same_state(state_of(tm), t0)

def test_teacher_none_is_frozen_copy():
    set_seed(5)
    learn = learner(cnn(4), DistillCallback(alpha=0.5, features=['2'], feature_loss='at'))
    s0 = state_of(learn.model)
    quiet_fit(learn, 1)
    cb = learn.distill
    assert cb.teacher is not learn.model and same_state(state_of(cb.teacher), s0) and not same_state(state_of(learn.model), s0)
    assert all(not p.requires_grad and p.grad is None for p in cb.teacher.parameters())
    first = cb.teacher
    quiet_fit(learn, 1)
    assert cb.teacher is first and same_state(state_of(first), s0)

def test_gradient_accumulation_and_mixed_precision(teacher):
    "The distillation terms are added before GradientAccumulation scales loss_grad; training works with both"
    set_seed(6)
    student = cnn(4)
    s0 = state_of(student)
    cap = Capture(MixedPrecision.order + 10)     # after every callback's after_loss
    learn = learner(student, [DistillCallback(teacher, loss='dkd', features=['6'], feature_loss='sp'),
                              GradientAccumulation(n_acc=128), cap]).to_fp16()
    quiet_fit(learn, 1)
    assert not same_state(state_of(student), s0)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])
    for r in cap.rows:                           # loss_grad is the whole distillation loss, scaled by bs/n_acc
        bs = len(r['yb'])
        assert float(r['loss_grad']) == pytest.approx(float(r['loss'])*bs/128, rel=1e-5)
        assert float(r['loss']) > 1.5*float(F.cross_entropy(r['pred'], r['yb']))
    assert float(learn.distill.last['logits']) > 0
    assert any(isinstance(c, MixedPrecision) for c in learn.cbs)

class CPUAutocast(Callback):
    "MixedPrecision's autocast window (before_batch .. after_loss), on the CPU in bfloat16"
    order = MixedPrecision.order
    def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
    def after_loss(self): self.ac.__exit__(None, None, None)

def test_teacher_runs_in_students_autocast(teacher):
    set_seed(7)
    tm = cnn(16); tm.load_state_dict(teacher.state_dict())
    dtypes = []
    tm[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    learn = learner(cnn(4), [DistillCallback(tm, features=['6'], feature_loss='at'), CPUAutocast()])
    quiet_fit(learn, 1)
    assert dtypes and set(dtypes[1:]) == {torch.bfloat16}    # dtypes[0] is the float32 probe at before_fit
    assert math.isfinite(learn.recorder.values[-1][0]) and learn.distill.last['at:6'].dtype == torch.float32

# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('kw, name', [(dict(T=0), '`T`'), (dict(T=-1), '`T`'), (dict(T=float('nan')), '`T`'),
    (dict(T='x'), '`T`'), (dict(alpha=-0.1), '`alpha`'), (dict(alpha=1.01), '`alpha`'), (dict(loss='mse'), '`loss`'),
    (dict(features=['0'], feature_loss='l1'), '`feature_loss`'), (dict(features=['0'], feature_loss={'at': -1}), 'feature_loss'),
    (dict(dkd_beta=-1), '`dkd_beta`')])
def test_bad_values(kw, name):
    with pytest.raises(ValueError, match=name): DistillCallback(**kw)

def test_bad_types():
    with pytest.raises(TypeError, match='`teacher`'): DistillCallback(teacher='resnet18')
    with pytest.raises(TypeError, match='`features`'): DistillCallback(features=3)
    with pytest.warns(UserWarning, match='Learner'):
        cb = DistillCallback(teacher=learner(cnn(2)))
    assert isinstance(cb.teacher, nn.Sequential)

@pytest.mark.parametrize('make, match', [
    (lambda s: DistillCallback(cnn(8), features={'6': 'nope'}), 'nope'),
    (lambda s: DistillCallback(cnn(8), features=['4.weight']), '4.weight'),
    (lambda s: DistillCallback(s), 'shares parameters'),
    (lambda s: DistillCallback(nn.Sequential(nn.Flatten(), nn.Linear(64, 5))), 'does not match'),
    (lambda s: DistillCallback(cnn(8), features={'6': '2'}, feature_loss='at'), 'spatial'),
    (lambda s: DistillCallback(cnn(8), features=['9'], feature_loss='at'), 'spatial'),
])
def test_bad_setup_fails_before_training(make, match):
    student = cnn(4)
    s0 = state_of(student)
    learn = learner(student)
    cb = make(student)
    with pytest.raises(ValueError, match=match): quiet_fit(learn, 1, cbs=cb)
    assert same_state(state_of(student), s0)
    assert all(not m._forward_hooks for m in student.modules())

# ---------------------------------------------------------------- channel-matched hints and unlabelled batches (issue #20)

def _compacted(teacher, ratio=0.5):
    "The teacher masked by L1 pruning (`plan.model`) and its compacted copy"
    from copy import deepcopy
    from fastslim.plan import SlimPlan
    masked = deepcopy(teacher).requires_grad_(True)   # the teacher fixture is frozen once a DistillCallback used it
    plan = SlimPlan(masked, torch.randn(2, 1, 8, 8))
    plan.select(plan.l1_scores(), ratio=ratio, scope='local')
    student = plan.compact()
    plan.apply()
    return masked, student

class EvalMode(Callback):
    "The student in eval mode during training steps (after fastai's TrainEvalCallback switched it to train)"
    order = 1
    def before_batch(self): self.learn.model.eval()

def test_match_loss_compares_the_kept_channels(teacher):
    "A compacted student against its masked teacher: every channel-matched hint is 0, as the channels are the same"
    masked, student = _compacted(teacher)
    assert student.slim_kept and all(len(v) < 16 or len(v) < 32 for v in student.slim_kept.values())
    cb = DistillCallback(masked, features='batchnorms', feature_loss='match', alpha=0.)
    learn = learner(student, cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0., cbs=EvalMode())   # lr 0, BatchNorm on running statistics as the teacher's
    hints = {k: float(v) for k, v in cb.last.items() if k.startswith('match:')}
    assert len(hints) == sum(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    assert max(hints.values()) < 1e-10, hints
    # against the dense (unmasked) teacher the removed channels' contributions differ: the hints are not 0
    cb = DistillCallback(teacher, features='batchnorms', feature_loss='match', alpha=0.)
    with learner(student, cb).no_bar() as l, l.no_logging(): l.fit(1, 0.)
    assert max(float(v) for k, v in cb.last.items() if k.startswith('match:')) > 1e-4

def test_match_needs_the_channel_record(teacher):
    "A narrower student that fastslim did not compact: 'match' says which layer and what is missing, before training"
    student = cnn(8)
    before = state_of(student)
    learn = learner(student, DistillCallback(teacher, features=['1'], feature_loss='match'))
    with pytest.raises(ValueError, match="'match'.*'1'.*slim_kept"): learn.fit(1, 1e-2)
    assert same_state(state_of(student), before)

def test_unlabelled_batches_learn_from_the_teacher(teacher):
    "Batches without targets: the student trains on the teacher's terms alone (the loss is the KD loss)"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    lab = digits_dls(bs=64)
    xs = torch.cat([b[0] for b in lab.train])
    unl = DataLoaders(DataLoader(list(zip(xs)), bs=64, shuffle=True, drop_last=True), lab.valid)
    set_seed(4)
    cb, cap = DistillCallback(teacher, T=2.), Capture(100)
    learn = Learner(unl, cnn(8), CrossEntropyLossFlat(), metrics=accuracy, cbs=[cb, cap])
    before = state_of(learn.model)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    assert not same_state(state_of(learn.model), before)        # without targets fastai alone would not step
    assert float(cb.last['task']) > 0 and abs(float(cap.rows[-1]['loss']) - float(cb.last['logits'])) < 1e-5   # task weight 0
    assert learn.validate()[1] > 0.5                           # learned from the teacher alone (chance is 0.1)
    nothing = Learner(unl, cnn(8), CrossEntropyLossFlat(), cbs=DistillCallback(teacher, alpha=0.))
    with pytest.raises(ValueError, match='nothing to learn'), nothing.no_bar(), nothing.no_logging(): nothing.fit(1, 1e-2)

# ---------------------------------------------------------------- refit_to_teacher: closed-form channel-matched start

def _logit_error(student, teacher, x):
    with torch.no_grad(): s, t = student.eval()(x), teacher.eval()(x)
    return float((s - t).pow(2).mean() / t.pow(2).mean())

def test_refit_brings_a_compacted_student_back(teacher):
    "Digits teacher pruned to a quarter of its channels: the refit (no labels, no gradient) restores most of the accuracy"
    _, student = _compacted(teacher, ratio=0.75)
    t0 = state_of(teacher)
    dls = digits_dls(bs=64)
    xs = [b[0] for b, _ in zip(dls.train, range(4))]
    before = learner(student).validate()[1]
    refit = refit_to_teacher(copy.deepcopy(student), teacher, xs)
    after = learner(refit).validate()[1]
    assert after > before + 0.4 and after > 0.75, (before, after)
    assert _logit_error(refit, teacher, xs[0]) < 0.5 * _logit_error(student, teacher, xs[0])
    assert same_state(state_of(teacher), t0)
    for n, b in refit.named_modules():          # BatchNorm statistics: the teacher's, at the kept channels
        if isinstance(b, nn.BatchNorm2d):
            assert torch.equal(b.running_mean, teacher.get_submodule(n).running_mean[refit.slim_kept[n]])

def test_refit_is_exact_when_the_student_is_the_teacher(teacher):
    "Same widths and weights: the least squares reproduces the teacher's layers, so the outputs are unchanged"
    student = copy.deepcopy(teacher)
    x = torch.cat([b[0] for b, _ in zip(digits_dls(bs=64).train, range(4))])
    with torch.no_grad(): y0 = teacher(x)
    refit_to_teacher(student, teacher, [x], positions=32, ridge=0.)
    with torch.no_grad(): assert torch.allclose(student(x), y0, atol=1e-3, rtol=1e-3)

def test_refit_on_torchvision_and_timm_resnets():
    "Compacted torchvision and timm ResNet-18s (random weights, residual streams, downsample shortcuts): the refit moves the logits toward the teacher's"
    import timm, torchvision
    from fastslim.plan import SlimPlan
    for make in (lambda: torchvision.models.resnet18(num_classes=10), lambda: timm.create_model('resnet18', num_classes=10)):
        torch.manual_seed(0)
        t = make().eval()
        with torch.no_grad():                                   # non-trivial BatchNorm statistics
            t.train(); [t(torch.randn(8, 3, 32, 32)) for _ in range(3)]; t.eval()
        plan = SlimPlan(copy.deepcopy(t), torch.randn(2, 3, 32, 32))
        plan.select(plan.l1_scores(), ratio=0.5, scope='local')
        s = plan.compact()
        xs = [torch.randn(16, 3, 32, 32) for _ in range(2)]
        err0 = _logit_error(s, t, xs[0])
        refit_to_teacher(s, t, xs)
        assert _logit_error(s, t, xs[0]) < 0.5 * err0

def test_refit_bad_input_before_any_weight_changes(teacher):
    _, student = _compacted(teacher)
    x = torch.randn(8, 1, 8, 8)
    before = state_of(student)
    with pytest.raises(ValueError, match='`batches`'): refit_to_teacher(student, teacher, [])
    with pytest.raises(ValueError, match='positions'): refit_to_teacher(student, teacher, [x], positions=0)
    with pytest.raises(ValueError, match='ridge'): refit_to_teacher(student, teacher, [x], ridge=-1)
    with pytest.raises(ValueError, match='teacher.*no layers'): refit_to_teacher(student, nn.Sequential(nn.Linear(64, 10)), [x])
    del student.slim_kept
    with pytest.raises(ValueError, match='slim_kept'): refit_to_teacher(student, teacher, [x])
    assert same_state(state_of(student), before)
    with pytest.raises(ValueError, match='refit'): DistillCallback(refit='yes')
    with pytest.raises(ValueError, match='refit_batches'): DistillCallback(refit_batches=0)

def test_callback_refits_once_on_image_batches(teacher, monkeypatch):
    "DistillCallback(refit=True) on fastai `TensorImage` batches: refits at the first fit only, a second fit keeps what the first trained"
    import fastslim.distill as D
    from fastai.vision.all import TensorImage, Transform
    calls = []
    def spy(*a, **k): calls.append(type(a[2][0][0])); return real(*a, **k)
    real = D.refit_to_teacher
    monkeypatch.setattr(D, 'refit_to_teacher', spy)
    _, student = _compacted(teacher, ratio=0.75)
    pruned_acc = learner(copy.deepcopy(student)).validate()[1]
    cb = DistillCallback(teacher, refit=True)
    learn = learner(student, cb)
    dls = learn.dls
    dls.train.after_batch.add(Transform(lambda b: TensorImage(b) if b.ndim == 4 else b))   # what ImageDataLoaders yields
    assert isinstance(dls.one_batch()[0], TensorImage)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.)      # lr 0: only the refit moves the weights
    assert len(calls) == 1 and calls[0] is torch.Tensor         # the refit saw plain tensors
    assert learn.validate()[1] > pruned_acc + 0.4
    w = [p.detach().clone() for p in learn.model.parameters()]   # (BatchNorm statistics still move in train mode)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(w, learn.model.parameters()))

def test_slim_refit_is_an_option(monkeypatch):
    "`learn.slim` refits only with `refit=True`, and only in fine-tuning"
    import fastslim.distill as D, fastslim.slim  # noqa: F401  (Learner.slim)
    calls = []
    real = D.refit_to_teacher
    monkeypatch.setattr(D, 'refit_to_teacher', lambda *a, **k: calls.append(1) or real(*a, **k))
    for refit, n in ((None, 0), (True, 1)):
        set_seed(0); calls.clear()
        learn = quiet_fit(learner(cnn(8)), 1)
        kw = {} if refit is None else dict(refit=refit)
        with learn.no_bar(), learn.no_logging():
            learn.slim('l1', target_macs=0.3, prune_epochs=0, finetune_epochs=1, measure_speed=False, **kw)
        assert len(calls) == n
