"The `fastslim` command line, run in-process on digits with tiny epochs; one real subprocess for the entry point."
import json, shutil, subprocess, sys
import pytest, torch
from fastslim.cli import main, slim as slim_cmd
from fastslim.export import load_model_dir, export as export_cmd
from fastslim.plan import load_slim

TINY = ['--dense-epochs', '1', '--sparse-epochs', '1', '--prune-epochs', '0', '--finetune-epochs', '1']

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    "One tiny `fastslim slim` run shared by the tests that read its output"
    out = tmp_path_factory.mktemp('run')/'out'
    rc = main(['slim', *TINY, '--out', str(out)])
    return rc, out

def test_slim_writes_everything(run_dir):
    rc, out = run_dir
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {'slim.pt', 'meta.json', 'report.json', 'run.json'} <= names
    assert any(n.endswith('.png') for n in names)
    run = json.loads((out/'run.json').read_text())
    assert run['method'] == 'slimming' and run['target_macs'] == 0.25 and run['dense_epochs'] == 1
    from dataclasses import fields
    from fastslim.slim import SlimConfig
    cfg = SlimConfig.from_dict({f.name: run[f.name] for f in fields(SlimConfig)})   # run.json holds the whole config
    assert cfg.to_dict() == {k: run[k] for k in cfg.to_dict()} and cfg.sparse_epochs == 1 and cfg.prune_epochs == 0 and cfg.distill
    rep = json.loads((out/'report.json').read_text())
    assert json.dumps(rep)  # valid JSON with content
    meta = json.loads((out/'meta.json').read_text())
    assert meta['arch'] == 'fastslim_vgg_tiny' and meta['kwargs']['num_classes'] == 10

def test_load_model_dir_rebuilds(run_dir):
    _, out = run_dir
    net = load_model_dir(out).eval()
    d = torch.load(out/'slim.pt', map_location='cpu', weights_only=True)
    sd = net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in d['state_dict'].items() if k in sd)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(): y = net(x)
    assert y.shape == (4, 10)
    import timm, fastslim.models
    again = load_slim(out/'slim.pt', lambda: timm.create_model('fastslim_vgg_tiny', num_classes=10, in_chans=1)).eval()
    with torch.no_grad(): torch.testing.assert_close(again(x), y)
    dense = timm.create_model('fastslim_vgg_tiny', num_classes=10, in_chans=1)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in dense.parameters())  # it is the slim one

def test_same_run_again_allowed_other_run_refused(run_dir, capsys):
    _, out = run_dir
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(['slim', *TINY, '--seed', '1', '--out', str(out)]) == 2    # a different run
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'out' in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(['slim', *TINY, '--out', str(out)]) == 0                    # the same run again

def test_export_onnx_int8(run_dir, tmp_path):
    _, src = run_dir
    out = tmp_path/'m'; shutil.copytree(src, out)
    assert main(['export', str(out), '--format', 'onnx-int8']) == 0   # `model` is positional
    assert (out/'model.onnx').stat().st_size > 0 and (out/'model_int8.onnx').stat().st_size > 0
    import onnxruntime as ort, numpy as np
    net = load_model_dir(out).eval()
    x = torch.randn(3, 1, 8, 8)
    got = ort.InferenceSession(str(out/'model.onnx')).run(None, {ort.InferenceSession(str(out/'model.onnx')).get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(): np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-3, atol=1e-4)

@pytest.mark.parametrize('cmd, func', [('slim', slim_cmd), ('export', export_cmd)])
def test_help_lists_every_parameter(cmd, func, capsys):
    import inspect
    assert main([cmd, '--help']) == 0
    text = capsys.readouterr().out
    for p in inspect.signature(func).parameters:
        assert f"--{p.replace('_', '-')}" in text or p in text, p

def test_top_level_help(capsys):
    assert main(['--help']) == 0
    text = capsys.readouterr().out
    assert 'slim' in text and 'export' in text

@pytest.mark.parametrize('args', [
    ['--data', 'nope'], ['--data', 'nope.npz'], ['--arch', 'nope_net'], ['--method', 'nope'],
    ['--target-macs', '0'], ['--target-macs', '1'], ['--target-macs', '1.5'], ['--target-macs', '-0.1'],
    ['--ratio', '0.5', '--target-macs', '0.5'], ['--ratio', '1.0'],
    ['--bs', '0'], ['--size', '0'], ['--lr', '-1'], ['--lr', 'nan'], ['--reg', '-1'], ['--dense-epochs', '-1'],
    ['--finetune-epochs', '-2'],
])
def test_bad_input(args, tmp_path, capsys):
    out = tmp_path/'out'
    assert main(['slim', '--dense-epochs', '0', *args, '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'error' in err, err
    assert not out.exists() or not any(out.iterdir())

@pytest.mark.parametrize('args, option', [(['--ratio', '0.5', '--target-macs', '0.5'], '--ratio'), (['--target-macs', '1.5'], '--target-macs'),
                                          (['--prune-epochs', '-1'], '--prune-epochs'), (['--method', 'sss'], '--ratio'), (['--method', 'nope'], '--method')])
def test_bad_value_names_the_option(args, option, tmp_path, capsys):
    "The config checks the slimming options; its message names them as the command line spells them"
    assert main(['slim', '--dense-epochs', '0', *args, '--out', str(tmp_path/'out')]) == 2
    assert f'`{option}`' in capsys.readouterr().err

def test_unknown_command(capsys):
    assert main(['nope']) == 2
    assert 'nope' in capsys.readouterr().err

def test_console_script_installed():
    exe = shutil.which('fastslim')
    assert exe is not None
    res = subprocess.run([exe, '--help'], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and 'slim' in res.stdout and 'export' in res.stdout

@pytest.fixture(scope='module')
def int8_run(tmp_path_factory):
    "One tiny `fastslim slim --quantize ptq` run shared by the tests of its int8 files"
    pytest.importorskip('onnxruntime'); pytest.importorskip('torchao')
    import contextlib, io
    out, text = tmp_path_factory.mktemp('int8')/'q', io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = main(['slim', '--method', 'l1', '--quantize', 'ptq', '--dense-epochs', '2', '--prune-epochs', '0', '--finetune-epochs', '1', '--out', str(out)])
    return rc, out, text.getvalue()

def test_slim_quantize_writes_an_int8_onnx_that_agrees(int8_run):
    rc, out, text = int8_run
    assert rc == 0 and 'int8.onnx predicts as PyTorch' in text
    stats = json.loads((out/'int8.json').read_text())
    assert stats['agreement'] >= 0.9 and stats['n'] > 0
    assert (out/'int8.pt2').stat().st_size > 0 and not [p for p in out.iterdir() if p.name.endswith('.tmp')]
    net = load_model_dir(out).eval()   # slim.pt is the compacted fp32 network
    assert sum(p.numel() for p in net.parameters()) < 24058 and json.loads((out/'run.json').read_text())['quantize'] == 'ptq'

def test_export_on_an_int8_run_rewrites_its_int8_onnx(int8_run, tmp_path, capsys):
    "`fastslim export` on a quantised run folder writes int8.onnx from int8.pt2 and states how far onnxruntime agrees with PyTorch's int8 model"
    import onnxruntime as ort, numpy as np
    from fastslim.quantize import load_int8
    _, src, _ = int8_run
    out = tmp_path/'q'; shutil.copytree(src, out)
    (out/'int8.onnx').unlink(); (out/'int8.json').unlink()
    capsys.readouterr()
    assert main(['export', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'int8.onnx' in text and "predicts as PyTorch's int8 model on" in text and 'largest logit difference' in text, text
    stats = json.loads((out/'int8.json').read_text())
    assert stats['agreement'] >= 0.9 and stats['n'] > 0 and f"{stats['agreement']:.1%}" in text
    assert (out/'model.onnx').is_file()                            # the fp32 file as before
    q, x = load_int8(out/'int8.pt2'), torch.rand(5, 1, 8, 8)
    sess = ort.InferenceSession(str(out/'int8.onnx'), providers=['CPUExecutionProvider'])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(): ref = q(x).numpy()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.6 and np.abs(got - ref).max() < 2

def test_export_on_an_int8_run_without_its_program_is_refused(int8_run, tmp_path, capsys):
    _, src, _ = int8_run
    out = tmp_path/'q'; shutil.copytree(src, out)
    (out/'int8.pt2').unlink()
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(['export', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'int8.pt2' in err and '`model`' in err, err
    assert sorted(p.name for p in out.iterdir()) == before           # nothing written

def test_slim_quantize_bad_value_names_the_option(tmp_path, capsys):
    assert main(['slim', '--quantize', 'int4', '--out', str(tmp_path/'x')]) == 2
    assert '`--quantize`' in capsys.readouterr().err and not (tmp_path/'x').exists()

def test_slim_round_to_keeps_every_pruned_width_a_multiple(tmp_path):
    out = tmp_path/'r'
    assert main(['slim', '--method', 'l1', '--round-to', '8', '--target-macs', '0.5', '--dense-epochs', '1', '--prune-epochs', '0',
                 '--finetune-epochs', '1', '--out', str(out)]) == 0
    net = load_model_dir(out)
    widths = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths and all(w % 8 == 0 for w in widths), widths
    assert json.loads((out/'run.json').read_text())['prune_kw'] == {'round_to': 8}

def test_slim_bad_round_to_names_the_option(tmp_path, capsys):
    assert main(['slim', '--method', 'l1', '--round-to', '0', '--out', str(tmp_path/'x')]) == 2
    assert '`--round-to`' in capsys.readouterr().err and not (tmp_path/'x').exists()

def test_slim_search_writes_the_study_plot(tmp_path):
    "`--search N`: stage 2's widths come from an N-trial study within the MACs budget; its plot lands next to the report"
    pytest.importorskip('optuna')
    out = tmp_path/'s'
    assert main(['slim', '--method', 'l1', '--search', '3', '--target-macs', '0.4', '--dense-epochs', '1', '--prune-epochs', '0',
                 '--finetune-epochs', '1', '--out', str(out)]) == 0
    rep = json.loads((out/'report.json').read_text())
    assert (out/'search.png').exists() and json.loads((out/'run.json').read_text())['search_kw'] == {'n_trials': 3}
    assert rep['slim']['macs'] <= 0.4 * 1.02 * rep['dense']['macs']

def test_slim_bad_search_names_the_option(tmp_path, capsys):
    assert main(['slim', '--method', 'l1', '--search', '0', '--out', str(tmp_path/'x')]) == 2
    assert '`--search`' in capsys.readouterr().err and not (tmp_path/'x').exists()
    assert main(['slim', '--method', 'l1', '--search', '3', '--ratio', '0.5', '--out', str(tmp_path/'x')]) == 2
    assert '`--target-macs`' in capsys.readouterr().err and not (tmp_path/'x').exists()

# ---------------------------------------------------------------- latency budgets (issue #19)

def test_slim_target_latency_runs_on_the_runtime_it_names(tmp_path, monkeypatch):
    "`--target-latency 0.5 --latency-runtime torch --latency-threads 2`: the budget reaches `LatencyModel` (its runtime a fake one: nothing is timed)"
    from test_latency import FakeTimer
    import fastslim.latency as L
    made = []
    def runtime(threads, n, stat): made.append(threads); return FakeTimer()
    monkeypatch.setitem(L.RUNTIMES, 'torch', runtime)
    monkeypatch.setenv(L.CACHE_ENV, str(tmp_path/'cache'))
    out = tmp_path/'l'
    assert main(['slim', '--method', 'l1', '--target-latency', '0.5', '--latency-runtime', 'torch', '--latency-threads', '2',
                 '--dense-epochs', '1', '--prune-epochs', '0', '--finetune-epochs', '0', '--out', str(out)]) == 0
    run, rep = (json.loads((out/f).read_text()) for f in ('run.json', 'report.json'))
    assert run['target_latency'] == 0.5 and run['target_macs'] is None and run['latency_kw'] == dict(runtime='torch', threads=2)
    assert made == [2] and len(list((tmp_path/'cache').iterdir())) == 1
    from fastslim.cli import build_model
    t, ch = FakeTimer(), next(iter(load_model_dir(out).parameters())).shape[1]
    ratio = t.cost(load_model_dir(out)) / t.cost(build_model(run['arch'], 10, ch))   # the fake runtime's latency, slim over dense
    assert abs(ratio / 0.5 - 1) <= 0.05 and rep['settings']['latency_measured'] == pytest.approx(ratio, abs=1e-4)
    assert rep['settings']['latency_runtime'].endswith('FakeTimer')
    assert rep['slim']['macs'] < 0.75 * rep['dense']['macs']

@pytest.mark.parametrize('args, option', [
    (['--target-latency', '1.5'], '--target-latency'), (['--target-latency', 'fast'], '--target-latency'),
    (['--target-latency', '0ms'], '--target-latency'), (['--target-latency', '0.5', '--ratio', '0.5'], '--target-latency'),
    (['--target-latency', '0.5', '--target-macs', '0.5'], '--target-macs'), (['--target-latency', '0.5', '--method', 'magnitude'], '--target-latency'),
    (['--target-latency', '0.5', '--method', 'sss'], '--target-latency'), (['--target-latency', '0.5', '--search', '3'], '--target-latency'),
    (['--target-latency', '0.5', '--latency-runtime', 'tensorrt'], '--latency-runtime'),
    (['--target-latency', '0.5', '--latency-threads', '0'], '--latency-threads'),
    (['--latency-runtime', 'torch'], '--target-latency'), (['--latency-threads', '2'], '--latency-threads')])
def test_slim_bad_latency_budget_names_the_option(args, option, tmp_path, capsys):
    "A bad latency budget or runtime is one line naming the option, before anything is trained or written"
    out = tmp_path/'x'
    assert main(['slim', '--method', 'l1', *args, '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'`{option}`' in err, err
    assert not out.exists()
