"ONNX export, int8 quantisation and the deployment report, on a small conv net trained on scikit-learn's digits."
import os, sys, json, textwrap
import numpy as np, pytest, torch
from fastslim.core import state_size
from torch import nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastslim.data import digits_dls
from fastai.torch_core import set_seed
from fastslim.export import *
from fastslim.export import export as export_cli

onnx, ort, _ = import_export_deps()

def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

@pytest.fixture(scope='module')
def learn():
    set_seed(0)   # python's, numpy's and torch's generators: fastai's loaders shuffle with python's, which earlier tests move
    learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    return learn

@pytest.fixture(scope='module')
def exported(learn, tmp_path_factory):
    d = tmp_path_factory.mktemp('onnx')
    return export_onnx(learn, d/'digits.onnx')

def test_export_is_one_verified_file_with_dynamic_batch(learn, exported):
    assert os.listdir(exported.path.parent) == ['digits.onnx']          # no external data file, no report
    proto = onnx.load(exported.path)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    assert exported.opset == OPSET and {o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')} == {OPSET}
    assert exported.max_abs_diff < 1e-4 and exported.rel_diff < 1e-4
    sess = ort_session(exported.path)
    x = torch.cat([b[0] for b in learn.dls.valid])[:77]
    for n in (1, 7, 77):                                                  # batch sizes never seen at export
        with torch.no_grad(): ref = learn.model.eval()(x[:n]).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x[:n].numpy()})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

def test_batchnorm_is_folded_and_model_untouched(tmp_path):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
    for bn in (net[1], net[4]):   # non-trivial statistics, so a wrongly folded BN would show in the outputs
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2); bn.weight.data.uniform_(0.5, 2); bn.bias.data.uniform_(-1, 1)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = export_onnx(net, tmp_path/'cb.onnx', example=torch.randn(1, 3, 6, 6))   # batch 1 example: still dynamic
    ops = [n.op_type for n in onnx.load(res.path).graph.node]
    assert 'BatchNormalization' not in ops and ops.count('Conv') == 2, ops
    assert res.rel_diff < 1e-4
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    dim0 = onnx.load(res.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value

def _qdq_nodes(path):
    g = onnx.load(path).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    return g, inits

def test_int8_static_qdq_within_one_point(learn, exported, tmp_path):
    q = quantize_onnx(exported, learn, out=tmp_path/'int8.onnx', n_batches=4)
    assert q == tmp_path/'int8.onnx' and os.listdir(tmp_path) == ['int8.onnx']
    g, inits = _qdq_nodes(q)
    ops = [n.op_type for n in g.node]
    assert 'QuantizeLinear' in ops and 'DequantizeLinear' in ops
    zps = [inits[n.input[2]] for n in g.node if n.op_type == 'QuantizeLinear' and len(n.input) > 2]
    assert zps and all(z.dtype == np.uint8 for z in zps)                  # uint8 activations
    w_scales = [inits[n.input[1]] for n in g.node if n.op_type == 'DequantizeLinear' and n.input[0] in inits
                and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4]
    assert sorted(len(s) for s in w_scales) == [16, 32, 32]               # int8 conv weights, one scale per channel
    acc32, acc8 = onnx_accuracy(exported, learn.dls), onnx_accuracy(q, learn.dls.valid)
    assert acc32 > 0.9 and abs(acc32 - acc8) <= 0.01, (acc32, acc8)
    assert os.path.getsize(q) < os.path.getsize(exported.path)
    assert abs(acc32 - float(learn.validate()[1])) < 1e-6

def test_calibration_from_plain_tensors(learn, exported, tmp_path):
    xs = [b[0] for b in learn.dls.train][:3]
    q = quantize_onnx(exported.path, xs, out=tmp_path/'t.onnx')
    assert abs(onnx_accuracy(q, learn.dls) - onnx_accuracy(exported, learn.dls)) <= 0.02

@pytest.mark.parametrize('calib', [[torch.randn(8, 3, 8, 8)], [torch.randn(8, 1, 4, 4)], [torch.randn(8, 64)], []])
def test_bad_calibration_is_refused_before_quantising(exported, tmp_path, calib):
    with pytest.raises(ValueError, match='`calib`'): quantize_onnx(exported, calib, out=tmp_path/'bad.onnx')
    assert not (tmp_path/'bad.onnx').exists()

@torch.library.custom_op('fastslim_test::opaque', mutates_args=())
def opaque(x:torch.Tensor)->torch.Tensor: return x * 2
opaque.register_fake(lambda x: torch.empty_like(x))

class Opaque(nn.Module):
    def __init__(self): super().__init__(); self.lin = nn.Linear(4, 4)
    def forward(self, x): return opaque(self.lin(x))

def test_unexportable_operator_is_named(tmp_path):
    with pytest.raises(ExportError, match=r'fastslim_test\.opaque') as e: export_onnx(Opaque(), tmp_path/'o.onnx', example=torch.randn(3, 4))
    assert e.value.op == 'fastslim_test.opaque.default'

def test_failing_op_reads_the_exception_chain():
    inner = RuntimeError("No ONNX function found for <OpOverload(op='aten.histc', overload='default')>")
    outer = RuntimeError('Failed to convert the exported program'); outer.__cause__ = inner
    assert failing_op(outer) == 'aten.histc.default'
    assert failing_op(RuntimeError('something else')) is None

def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match='`example`'): export_onnx(small_cnn(), tmp_path/'a.onnx')
    with pytest.raises(ValueError, match='`example`'): export_onnx(small_cnn(), tmp_path/'a.onnx', example=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match='`path`'): export_onnx(small_cnn(), tmp_path/'a.pt', example=torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match='`model_or_learner`'): export_onnx('net', tmp_path/'a.onnx', example=torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match='`path`'): quantize_onnx(tmp_path/'missing.onnx', [torch.randn(2, 1, 8, 8)])
    assert os.listdir(tmp_path) == []

@pytest.mark.parametrize('missing', ['onnx', 'onnxruntime', 'onnxscript'])
def test_missing_export_extra_names_it(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ImportError, match=r'fastslim\[export\]') as e: export_onnx(small_cnn(), tmp_path/'a.onnx', example=torch.randn(2, 1, 8, 8))
    assert f'`{missing}`' in str(e.value)
    with pytest.raises(ImportError, match=r'fastslim\[export\]'): quantize_onnx(tmp_path/'a.onnx', [])

def test_missing_torchao_names_it(monkeypatch, learn):
    monkeypatch.setitem(sys.modules, 'torchao', None)
    with pytest.raises(ImportError, match='pip install torchao'): quantize_pt2e(learn)

def test_pt2e_int8_within_one_point(learn):
    pytest.importorskip('torchao', reason='torchao is optional (pip install torchao)')
    q = quantize_pt2e(learn, n_batches=4)
    acc32, acc8 = torch_accuracy(learn.model, learn.dls), torch_accuracy(q, learn.dls)
    assert abs(acc32 - acc8) <= 0.01, (acc32, acc8)
    sd = q.state_dict()
    assert any(t.dtype == torch.int8 for t in sd.values())
    assert not any(t.dtype == torch.float32 and t.ndim == 4 for t in sd.values())   # no fp32 conv weight left behind
    assert state_size(q) < state_size(learn.model) / 2

def test_deploy_report(learn, exported, tmp_path):
    q = quantize_onnx(exported, learn, out=tmp_path/'q.onnx', n_batches=2)
    rep = deploy_report({'torch': learn.model, 'onnx': exported, 'int8': q}, learn.dls, n=3)
    assert [r['name'] for r in rep.rows] == ['torch', 'onnx', 'int8']
    assert rep['onnx']['size'] == os.path.getsize(exported.path) and rep['int8']['size'] == os.path.getsize(q)
    assert rep.ratios('torch') == dict(smaller=1., faster_bs1=1., faster_bs32=1., acc_delta=0.)
    assert rep.ratios('int8')['smaller'] > 1
    assert abs(rep['onnx']['acc'] - rep['torch']['acc']) < 1e-6
    text = repr(rep)
    assert 'ms bs32' in text and len(text.splitlines()) == 5
    with pytest.raises(TypeError, match='`models'): deploy_report({'x': 'model.pt'}, learn.dls, n=1)

def test_deploy_report_interleaves_the_timed_runs(learn):
    "Every candidate runs in each round, so load that comes and goes slows all rows alike; each latency is the median of its `n` runs"
    calls = []
    class Logged(nn.Module):
        def __init__(self, tag, m): super().__init__(); self.tag, self.m = tag, m
        def forward(self, x):
            if not torch.is_grad_enabled(): calls.append((self.tag, len(x)))
            return self.m(x)
    import copy
    models = {t: Logged(t, copy.deepcopy(learn.model)) for t in 'ab'}
    rep = deploy_report(models, learn.dls, bs=(1, 4), n=6, rounds=3)
    timed = [c for c in calls if c[1] in (1, 4)]
    first_b = timed.index(('b', 1))
    assert ('a', 1) in timed[first_b:], "model a runs again after b started: the rounds interleave"
    assert all(rep[t][f'lat_bs{s}'] > 0 for t in 'ab' for s in (1, 4))
    with pytest.raises(ValueError, match='`rounds`'): deploy_report(models, learn.dls, n=3, rounds=0)
    with pytest.raises(ValueError, match='`n`'): deploy_report(models, learn.dls, n=0)

def test_export_model_writes_next_to_model(learn, tmp_path):
    with pytest.raises(ValueError, match='`format`'): export_model(learn.model, learn.dls, tmp_path, format='tflite')
    assert os.listdir(tmp_path) == []
    out = export_model(learn.model, learn.dls, tmp_path, format='onnx-int8', n_calib=2)
    assert sorted(os.listdir(tmp_path)) == ['model.onnx', 'model_int8.onnx']
    assert out['paths'] == {'onnx': tmp_path/'model.onnx', 'onnx-int8': tmp_path/'model_int8.onnx'}
    assert out['accuracy']['onnx'] > 0.9 and abs(out['accuracy']['onnx'] - out['accuracy']['onnx-int8']) <= 0.01

def test_export_command_loads_a_saved_slim_model(learn, tmp_path, monkeypatch, capsys):
    plan_mod = pytest.importorskip('fastslim.plan')
    (tmp_path/'tinyarch.py').write_text(textwrap.dedent('''
        from torch import nn
        def net(): return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))'''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import tinyarch
    net = tinyarch.net()
    x = learn.dls.one_batch()[0]
    plan = plan_mod.SlimPlan(net, x)
    plan.select(plan.l1_scores(), ratio=0.5).apply()
    d = tmp_path/'run'; d.mkdir()
    plan_mod.save_slim(plan.compact(), d/'slim.pt')
    with pytest.raises(ValueError, match='meta.json'): load_model_dir(d)
    (d/'meta.json').write_text(json.dumps(dict(arch='tinyarch:net')))
    with pytest.raises(ValueError, match="allow=\\['tinyarch:net'\\]"): export_cli(str(d), format='onnx')   # not trusted by default
    assert not (d/'model.onnx').exists()
    assert export_cli(str(d), format='onnx', allow='tinyarch:net') == 0
    assert sorted(os.listdir(d)) == ['meta.json', 'model.onnx', 'slim.pt']
    assert 'accuracy' in capsys.readouterr().out
    assert onnx.load(d/'model.onnx').graph.node[0].op_type == 'Conv'
    with pytest.raises(ValueError, match='`format`'): export_cli(str(d), format='tflite')
    with pytest.raises(ValueError, match='slim.pt'): export_cli(str(tmp_path), format='onnx')

def test_arch_names_resolve_through_timm_and_imports():
    from fastslim.export import build_arch
    assert isinstance(build_arch('torch.nn:Linear', dict(in_features=3, out_features=2), allow=['torch.nn:Linear']), nn.Linear)
    assert isinstance(build_arch('torch.nn:Linear', dict(in_features=3, out_features=2), allow=[nn.Linear]), nn.Linear)
    assert isinstance(build_arch('torch.nn:Linear', dict(in_features=3, out_features=2), trust_code=True), nn.Linear)
    pytest.importorskip('fastslim.models')
    net = build_arch('fastslim_vgg_tiny', dict(num_classes=10, in_chans=1))
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)

# ---------------------------------------------------------------- trust (issue #16): no code from a model folder, atomic files
def _folder(tmp_path, meta, model=None):
    from fastslim.plan import save_slim
    d = tmp_path/'run'; d.mkdir(exist_ok=True)
    save_slim(model if model is not None else nn.Linear(3, 2), d/'slim.pt')
    (d/'meta.json').write_text(json.dumps(meta))
    return d

@pytest.mark.parametrize('arch', ['os:system', 'subprocess:call', 'builtins:exec', 'os.path:join', 'hf-hub:x/y'])
def test_meta_json_cannot_run_code(tmp_path, arch):
    flag = tmp_path/'pwned'
    d = _folder(tmp_path, dict(arch=arch, kwargs=dict(command=f'touch {flag}', args=['touch', str(flag)])))
    with pytest.raises(ValueError, match=f"names the callable '{arch}'.*runs no other code.*allow="): load_model_dir(d)
    with pytest.raises(ValueError, match='runs no other code'): export_cli(str(d), format='onnx')
    assert not flag.exists() and sorted(os.listdir(d)) == ['meta.json', 'slim.pt']

def test_allowed_callables_and_bad_arguments(tmp_path):
    d = _folder(tmp_path, dict(arch='torch.nn:Linear', kwargs=dict(in_features=3, out_features=2)))
    assert isinstance(load_model_dir(d, allow=['torch.nn:Linear']), nn.Linear)
    assert isinstance(load_model_dir(d, trust_code=True), nn.Linear)
    with pytest.raises(ValueError, match='`trust_code`'): load_model_dir(d, trust_code='yes')
    (d/'meta.json').write_text('{"arch": ')
    with pytest.raises(ValueError, match='not valid JSON'): load_model_dir(d)
    for meta, word in [(dict(arch='no_such_model_xyz'), 'unknown architecture'), (dict(arch=3), "'arch'"),
                       (dict(arch='resnet18', kwargs=[1]), "'kwargs'"), (dict(arch='resnet18', kwargs=dict(pretrained=True)), 'may not set'),
                       (dict(arch='resnet18', kwargs=dict(checkpoint_path='/etc/passwd')), 'may not set')]:
        (d/'meta.json').write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=word): load_model_dir(d)

def test_torchvision_architecture_folder_loads(tmp_path):
    "What `fastslim slim --arch mobilenet_v3_small` writes (kwargs with `in_chans`, which torchvision rejects) loads"
    import torchvision
    from fastslim.plan import SlimPlan, save_slim
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    plan = SlimPlan(net, torch.randn(2, 3, 32, 32))
    plan.select(plan.l1_scores(), ratio=0.3, min_keep=0.1).apply()
    small = plan.compact()
    d = _folder(tmp_path, dict(arch='mobilenet_v3_small', kwargs=dict(num_classes=10, in_chans=3)), small)
    back = load_model_dir(d)                                              # was: Unknown model (mobilenet_v3_small)
    assert state_size(back) == state_size(small) and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), small.state_dict().values()))
    (d/'meta.json').write_text(json.dumps(dict(arch='mobilenet_v3_small', kwargs=dict(num_classes=10, in_chans=1))))
    with pytest.raises(ValueError, match='takes 3 input channels.*`in_chans`=1'): load_model_dir(d)

@pytest.mark.parametrize('opset', [0, 17, 999, 20.0, '20', True])
def test_bad_opset_is_refused_before_writing(tmp_path, opset):
    path = tmp_path/'m.onnx'; path.write_bytes(b'user file')
    with pytest.raises(ValueError, match=r'`opset` must be an integer from 18 to \d+'):
        export_onnx(nn.Linear(3, 2), path, example=torch.randn(2, 3), opset=opset)
    assert path.read_bytes() == b'user file' and os.listdir(tmp_path) == ['m.onnx']

def test_opset_reported_is_the_one_written(tmp_path):
    res = export_onnx(nn.Linear(3, 2), tmp_path/'m.onnx', example=torch.randn(2, 3), opset=18)
    assert res.opset == 18 == max(o.version for o in onnx.load(res.path).opset_import if o.domain in ('', 'ai.onnx'))

def test_failed_check_leaves_the_users_file_untouched(tmp_path, monkeypatch):
    import fastslim.export as E
    path = tmp_path/'m.onnx'; path.write_bytes(b'user file')
    monkeypatch.setattr(E, '_verify', lambda *a: (_ for _ in ()).throw(ExportError('outputs differ')))
    with pytest.raises(ExportError, match='outputs differ'): export_onnx(nn.Linear(3, 2), path, example=torch.randn(2, 3))
    assert path.read_bytes() == b'user file' and os.listdir(tmp_path) == ['m.onnx']   # was: overwritten, unverified
    with pytest.raises(ValueError, match='`rtol`'): export_onnx(nn.Linear(3, 2), path, example=torch.randn(2, 3), rtol=-1)
    monkeypatch.undo()
    res = export_onnx(nn.Linear(3, 2), path, example=torch.randn(2, 3))
    assert res.path == path and os.listdir(tmp_path) == ['m.onnx'] and path.read_bytes() != b'user file'

def test_onnx_file_carries_no_exporter_debug_records(tmp_path):
    "The dynamo exporter's per-node stack traces were most of a small model's file; the written file has none"
    import onnx
    from fastslim.export import export_onnx
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    export_onnx(net, tmp_path/'m.onnx', example=torch.randn(2, 1, 8, 8))
    m = onnx.load(tmp_path/'m.onnx')
    assert m.graph.node and not any(n.metadata_props for n in m.graph.node)
    assert (tmp_path/'m.onnx').stat().st_size < 4 * sum(len(i.raw_data) for i in m.graph.initializer) + 4096
