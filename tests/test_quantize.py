"QuantizeCallback: fake quantisers inserted, the freeze schedule honoured, the teacher untouched, the int8 result runs."
import warnings
import pytest, torch
from torch import nn
from fastai.vision.all import Learner, Callback, accuracy, set_seed, MixedPrecision
from fastslim.data import digits_dls
from fastslim.distill import DistillCallback
from fastslim.test_utils import digits_cnn, quiet_fit, valid_acc, state_hash
pytest.importorskip('torchao')
from fastslim.quantize import QuantizeCallback, QuantizeError
from torchao.quantization.pt2e import FakeQuantizeBase
pytestmark = pytest.mark.xdist_group('quantize')   # the trained and int8 fixtures (torchao's convert) are made once, on one worker

warnings.filterwarnings('ignore')

@pytest.fixture(scope='module')
def trained():
    set_seed(0)
    learn = quiet_fit(Learner(digits_dls(bs=64), digits_cnn((8, 8, 16, 16)), metrics=accuracy), 3, 1e-2)
    return learn.model, valid_acc(learn)

def fresh(model):
    import copy
    set_seed(0)
    return Learner(digits_dls(bs=64), copy.deepcopy(model), metrics=accuracy)

def fake_quants(model): return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]

class Probe(Callback):
    "Per training batch: pct_train, observers on or off, the quantisers' scales, and the first BatchNorm's running mean"
    order = 90
    def before_fit(self): self.rows = []
    def after_batch(self):
        if not self.training: return
        fq = fake_quants(self.learn.model)
        rm = next(b for n, b in self.learn.model.named_buffers() if 'running_mean' in n)
        self.rows.append((self.learn.pct_train, [bool(f.observer_enabled.item()) for f in fq],
                          [f.scale.detach().clone() for f in fq], rm.detach().clone()))

def test_fake_quantisers_are_inserted_on_every_conv_and_linear(trained):
    learn = fresh(trained[0])
    cb = QuantizeCallback(convert=False)
    quiet_fit(learn, 1, 1e-3, cbs=cb)
    assert learn.model is cb.prepared and cb.quantized is None
    weights = [n for n in learn.model.graph.nodes if n.op == 'call_module' and 'activation_post_process' in str(n.target)
               and any(u.op == 'call_function' and 'conv' in str(u.target) or 'linear' in str(u.target) for u in n.users)]
    assert len(fake_quants(learn.model)) >= 2 * 5   # a weight and an input quantiser for 4 convs and the head
    assert len(weights) >= 5

def test_observers_and_batchnorm_freeze_on_schedule(trained):
    learn, probe = fresh(trained[0]), Probe()
    quiet_fit(learn, 4, 1e-3, cbs=[QuantizeCallback(freeze_bn=0.25, freeze_observers=0.5, convert=False), probe])
    before = [r for r in probe.rows if r[0] < 0.5 - 1e-9]
    after = [r for r in probe.rows if r[0] >= 0.5 + 0.05]
    assert before and after
    assert all(all(r[1]) for r in before) and not any(any(r[1]) for r in after)   # observers on, then off
    for r in after[1:]: assert all(torch.equal(a, b) for a, b in zip(r[2], after[0][2]))   # scales no longer move
    bn_after = [r[3] for r in probe.rows if r[0] >= 0.25 + 0.05]
    bn_before = [r[3] for r in probe.rows if r[0] < 0.25 - 1e-9]
    assert all(torch.equal(m, bn_after[0]) for m in bn_after)                 # running statistics frozen...
    assert not torch.equal(bn_before[0], bn_before[-1])                        # ...after moving while free

@pytest.fixture(scope='module')
def int8(trained):
    "One QAT run with the dense network as teacher, converted to int8 (torchao's convert is the slow part): shared by the tests of its result"
    teacher = fresh(trained[0]).model.eval()
    h = state_hash(teacher)
    learn, cb = fresh(trained[0]), QuantizeCallback()
    quiet_fit(learn, 2, 1e-3, cbs=[cb, DistillCallback(teacher)])
    return learn, cb, teacher, h

def test_int8_result_runs_and_keeps_accuracy_with_the_teacher_untouched(trained, int8):
    fp32, (learn, cb, teacher, h) = trained[1], int8
    assert state_hash(teacher) == h
    assert isinstance(learn.model, torch.fx.GraphModule) and learn.model is cb.quantized
    ops = {str(n.target) for n in learn.model.graph.nodes if n.op == 'call_function'}
    assert any('quantize_per_tensor' in o for o in ops) and any('dequantize_per_channel' in o for o in ops)
    x, _ = learn.dls.valid.one_batch()
    with torch.no_grad():
        q, f = learn.model(x), cb.float_model.eval()(x)
    assert (q.argmax(-1) == f.argmax(-1)).float().mean() >= 0.9     # int8 computes what the QAT-trained fp32 weights do
    assert valid_acc(learn) >= fp32 - 0.03

class ValueBranch(nn.Module):
    def forward(self, x): return x if x.sum() > 0 else -x

@pytest.mark.parametrize('case', ['fp16', 'unexportable', 'fraction'])
def test_bad_input_is_refused_before_training(trained, case):
    if case == 'fraction':
        with pytest.raises(ValueError, match='`freeze_observers`'): QuantizeCallback(freeze_observers=2)
        return
    if case == 'fp16':
        learn, cbs, match = fresh(trained[0]), [QuantizeCallback(), MixedPrecision()], 'MixedPrecision'
    else:
        learn = Learner(digits_dls(bs=64), nn.Sequential(nn.Conv2d(1, 4, 3), ValueBranch(), nn.Flatten(), nn.Linear(144, 10)))
        cbs, match = [QuantizeCallback()], r'layer `1` \(ValueBranch\)'
    h = state_hash(learn.model)
    with pytest.raises(ValueError, match=match): quiet_fit(learn, 1, 1e-3, cbs=cbs)
    assert state_hash(learn.model) == h

def test_int8_onnx_agrees_with_pytorch_int8(int8, tmp_path):
    pytest.importorskip('onnxruntime')
    import onnx
    from fastslim.quantize import export_int8_onnx
    learn = int8[0]
    res = export_int8_onnx(learn.model, tmp_path/'int8.onnx', learn.dls)
    assert res['agreement'] >= 0.98 and res['n'] == len(learn.dls.valid_ds)   # 7-bit activations: no int16 saturation on AVX2
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {n.op_type for n in onnx.load(tmp_path/'int8.onnx').graph.node}
    with pytest.raises(ValueError, match='`min_agreement`'): export_int8_onnx(learn.model, tmp_path/'x.onnx', learn.dls, min_agreement=2)
    assert not (tmp_path/'x.onnx').exists()

def test_report_explains_int8_latency_instead_of_suggesting_round_to():
    from fastslim.report import speed_warning
    dense = dict(macs=1000, latency_32=1.0)
    slim = dict(macs=100, latency_32=0.8, int8=True)
    w = speed_warning(dense, slim, {'conv': (5, 16)})
    assert 'ONNX Runtime' in w and 'round_to' not in w
    assert 'round_to' in speed_warning(dense, {**slim, 'int8': False}, {'conv': (5, 16)})

def test_speed_warning_does_not_suggest_round_to_when_every_width_is_a_multiple():
    from fastslim.report import speed_warning
    w = speed_warning(dict(macs=1000, latency_32=1.0), dict(macs=100, latency_32=0.4), {'a': (8, 16), 'b': (24, 32)})
    assert 'already a multiple of 8' in w and 'prune with `round_to' not in w

def test_qat_runs_on_fastai_image_batches(tmp_path):
    "ImageDataLoaders give TensorImage batches: capture, fake-quant training and the int8 result all take them"
    import timm, fastslim.models
    from fastai.vision.all import ImageDataLoaders
    from fastslim.data import digits_folder
    digits_folder(tmp_path, size=16, per_class=20)
    set_seed(0)
    dls = ImageDataLoaders.from_folder(tmp_path, valid_pct=0.2, bs=32, seed=0)
    learn = Learner(dls, timm.create_model('fastslim_vgg_tiny', num_classes=dls.c, in_chans=3), metrics=accuracy)
    assert type(dls.one_batch()[0]).__name__ == 'TensorImage'
    quiet_fit(learn, 1, 1e-3, cbs=QuantizeCallback())
    assert isinstance(learn.model, torch.fx.GraphModule)
    x = dls.valid.one_batch()[0]
    with torch.no_grad(): assert learn.model(x).shape == (len(x), dls.c)
    assert 0 <= valid_acc(learn) <= 1

def _optimized_ops(path, tmp_path):
    "Op counts of the graph onnxruntime runs for `path` (its optimized model, dumped by the session)"
    import collections, onnx, onnxruntime as ort
    so = ort.SessionOptions(); so.optimized_model_filepath = str(tmp_path/'optimized.onnx'); so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=['CPUExecutionProvider'])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path/'optimized.onnx').graph.node)

@pytest.fixture(scope='module')
def resnet():
    "A small CIFAR ResNet (one basic block a stage, 8 wide) trained briefly on 8x8 digits"
    from fastslim.models import CifarResNet
    set_seed(0)
    net = CifarResNet(8, in_channels=1, stem_width=8, stage_widths=[8, 8, 16])
    return quiet_fit(Learner(digits_dls(bs=64), net, metrics=accuracy), 2, 1e-2).model

@pytest.mark.parametrize('fuse_add', [False, True])
def test_residual_adds_run_as_int8_in_onnxruntime(resnet, tmp_path, fuse_add):
    "Inductor's recipe (fuse_add) leaves the conv before each residual add in fp32, which ONNX Runtime runs from dequantised weights; the default quantises it, so every conv is QLinearConv and every add QLinearAdd"
    pytest.importorskip('onnxruntime')
    from fastslim.quantize import export_int8_onnx
    learn = fresh(resnet)
    quiet_fit(learn, 1, 1e-3, cbs=QuantizeCallback(fuse_add=fuse_add))
    res = export_int8_onnx(learn.model, tmp_path/'int8.onnx', learn.dls)
    assert res['agreement'] >= 0.9, res
    ops, n_conv = _optimized_ops(tmp_path/'int8.onnx', tmp_path), sum(isinstance(m, nn.Conv2d) for m in resnet.modules())
    n_add = 3   # one residual block a stage
    if fuse_add: assert ops['QLinearConv'] < n_conv and ops['QLinearAdd'] == 0, ops
    else: assert ops['QLinearConv'] == n_conv and ops['QLinearAdd'] == n_add and ops['FusedConv'] + ops['Conv'] == 0, ops

def test_ptq_residual_adds_run_as_int8_in_onnxruntime(resnet, tmp_path):
    pytest.importorskip('onnxruntime')
    from fastslim.export import quantize_pt2e
    from fastslim.quantize import export_int8_onnx
    dls = digits_dls(bs=64)
    q = quantize_pt2e(resnet, dls.train, example=dls.one_batch()[0], n_batches=4)
    export_int8_onnx(q, tmp_path/'int8.onnx', dls)
    ops = _optimized_ops(tmp_path/'int8.onnx', tmp_path)
    assert ops['QLinearConv'] == sum(isinstance(m, nn.Conv2d) for m in resnet.modules()) and ops['QLinearAdd'] == 3, ops

def test_int8_model_saves_and_loads(int8, tmp_path):
    from fastslim.quantize import save_int8, load_int8
    learn = int8[0]
    x = learn.dls.valid.one_batch()[0].cpu()
    p = save_int8(learn.model, tmp_path/'int8.pt2', x[:1])          # a batch of 1: the saved batch stays dynamic
    assert sorted(f.name for f in tmp_path.iterdir()) == ['int8.pt2']  # no temporary file left
    again = load_int8(p)
    with torch.no_grad(): torch.testing.assert_close(again(x), learn.model(x))
    assert again(x[:3]).shape == (3, 10)
    with pytest.raises(ValueError, match='`path`'): load_int8(tmp_path/'missing.pt2')
    (tmp_path/'junk.pt2').write_bytes(b'junk')
    with pytest.raises(ValueError, match='torch.export'): load_int8(tmp_path/'junk.pt2')
    with pytest.raises(ValueError, match='`path`'): save_int8(learn.model, tmp_path, x)
    with pytest.raises(ValueError, match='fuse_add'): QuantizeCallback(fuse_add='yes')
