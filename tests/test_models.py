"Tests of fastslim.models: the papers' parameter counts, forward shapes, timm names, width rebuilds, training presets."
import random
import pytest
import torch
from torch import nn
import timm
import torch_pruning as tp
from fastai.callback.core import Callback, CancelEpochException
from fastai.callback.schedule import ParamScheduler
from fastslim.core import count_params
from fastslim.data import digits_dls, tensor_dls
from fastslim.models import *
from fastslim.blocks import residual_blocks

# Parameter counts published in the papers (CIFAR-10). ResNet-20/56/110 are published for parameter-free zero-padding
# shortcuts; ours project with a 1x1 conv + BN in the two stride-2 blocks, which adds exactly 2,752 parameters.
PAPER = {
    'fastslim_vgg19_bn_cifar': 20.04e6,         # Network Slimming, Table 1
    'fastslim_preresnet164_cifar': 1.70e6,      # Network Slimming, Table 1
    'fastslim_densenet40_cifar': 1.02e6,        # DenseNet, Table 2 / Network Slimming, Table 1
    'fastslim_densenet_bc100_cifar': 0.77e6,    # DenseNet, Table 2
    'fastslim_resnext29_8x64d_cifar': 34.4e6,   # ResNeXt, Table 7
    'fastslim_resnet164_cifar': 1.70e6,         # Identity Mappings, Table 2 (original ResNet-164)
}
# (published millions, digits published, parameters of our two projections: 1x1 conv + BN, or a bare 1x1 conv in pre-act nets)
OPTION_A = {'fastslim_resnet20_cifar': (0.27, 2, 2752), 'fastslim_resnet56_cifar': (0.85, 2, 2752),
            'fastslim_resnet110_cifar': (1.7, 1, 2752), 'fastslim_preresnet110_cifar': (1.7, 1, 2560)}

def build(name, **kwargs):
    "A model from timm, on the meta device (no memory, no init cost) unless `device` is given"
    device = kwargs.pop('device', 'meta')
    with torch.device(device): return timm.create_model(name, **kwargs)

def local_digits(**kwargs):
    "`digits_dls(**kwargs)` loaded in the main process (no worker start-up per epoch), batch 64"
    d = digits_dls(**kwargs)
    x = torch.cat([d.train_ds.tensors[0], d.valid_ds.tensors[0]])
    y = torch.cat([d.train_ds.tensors[1], d.valid_ds.tensors[1]])
    return tensor_dls(x, y, bs=64, num_workers=0)

def shapes(m): return {k: tuple(v.shape) for k, v in m.state_dict().items()}

@pytest.mark.parametrize('name', sorted(PAPER))
def test_param_counts_match_papers(name):
    n = count_params(build(name, num_classes=10))
    assert abs(n / PAPER[name] - 1) < 0.005, (name, n)

@pytest.mark.parametrize('name', sorted(OPTION_A))
def test_resnet_counts_are_option_a_plus_two_projections(name):
    "Without the two projections the count rounds to the paper's (millions, to the paper's precision)"
    n = count_params(build(name, num_classes=10))
    paper, digits, proj = OPTION_A[name]
    assert round((n - proj) / 1e6, digits) == paper
    assert abs(n / (paper * 1e6) - 1) < 0.02

def test_exact_counts():
    "Counts worked out by hand from the layer shapes (conv weights + 2 per BN channel + Linear)"
    conv = lambda ci, co, k=3: ci*co*k*k
    vgg19 = [64, 64, 128, 128] + [256]*4 + [512]*8
    w = sum(conv(ci, co) for ci, co in zip([3] + vgg19[:-1], vgg19)) + 2*sum(vgg19) + 512*10 + 10
    assert count_params(build('fastslim_vgg19_bn_cifar')) == w == 20_035_018
    # ResNet-20 with option-B projections: stem, 9 basic blocks, 2 projections, fc
    blocks = [(16, 16)]*3 + [(16, 32)] + [(32, 32)]*2 + [(32, 64)] + [(64, 64)]*2
    r = conv(3, 16) + 32 + sum(conv(ci, co) + conv(co, co) + 4*co for ci, co in blocks)
    r += conv(16, 32, 1) + 64 + conv(32, 64, 1) + 128 + 64*10 + 10
    assert count_params(build('fastslim_resnet20_cifar')) == r
    # DenseNet-40: 16-channel stem, 36 BN-ReLU-conv3x3 layers of 12, 2 transitions, final BN, fc
    d, ni = conv(3, 16), 16
    for b in range(3):
        for _ in range(12): d += 2*ni + conv(ni, 12); ni += 12
        if b < 2: d += 2*ni + conv(ni, ni, 1)
    d += 2*ni + ni*10 + 10
    assert count_params(build('fastslim_densenet40_cifar')) == d
    assert count_params(build('fastslim_densenet40_cifar', stem_width=24)) == pytest.approx(1.06e6, rel=0.005)

def test_num_classes_and_in_chans():
    m = build('fastslim_densenet_bc100_cifar', num_classes=100, in_chans=1)
    assert m.classifier.out_features == 100 and m.features.stem.in_channels == 1
    assert m.get_classifier() is m.classifier

@pytest.mark.parametrize('name', [n for n in ZOO if n != 'fastslim_vgg_tiny'])
def test_forward_cifar_batch(name):
    m = build(name, num_classes=7, device='cpu').eval()
    bs = 1 if 'resnext' in name else 2
    with torch.no_grad(): y = m(torch.randn(bs, 3, 32, 32))
    assert y.shape == (bs, 7) and torch.isfinite(y).all()

def test_all_names_registered_and_pretrained_refused():
    assert set(ZOO) <= set(timm.list_models('fastslim_*'))
    for name in ZOO:
        with pytest.raises(ValueError, match='`pretrained`'): timm.create_model(name, pretrained=True)
    with pytest.raises(TypeError): build('fastslim_resnet20_cifar', drop_rate=0.1)

def test_vgg_tiny_takes_small_inputs_and_learns_digits():
    m = timm.create_model('fastslim_vgg_tiny', num_classes=10)
    for s in (8, 13, 32): assert m(torch.randn(2, 1, s, s)).shape == (2, 10)
    learn = preset_learner(m, local_digits(), 'slimming', in_channels=1)
    with learn.no_bar(), learn.no_logging():
        learn.fit_preset(epochs=2)
        assert learn.validate()[1] > 0.8

def test_bad_arguments_are_named():
    for kw, name in [(dict(depth=21), '`depth`'), (dict(depth=20, cfg=[16]*8), '`cfg`'), (dict(depth=20, block='x'), '`block`'),
                     (dict(depth=20, stage_widths=[16, 0, 64]), '`stage_widths`'), (dict(depth=20, stem_width=-1), '`stem_width`')]:
        with pytest.raises(ValueError, match=name): CifarResNet(**kw)
    with pytest.raises(ValueError, match='`depth`'): CifarResNet(32, block='bottleneck')
    with pytest.raises(ValueError, match='`depth`'): CifarVGG(12)
    with pytest.raises(ValueError, match='`cfg`'): CifarVGG(cfg=['M'])
    with pytest.raises(ValueError, match='`compression`'): CifarDenseNet(40, compression=0)
    with pytest.raises(ValueError, match='`cfg`'): CifarDenseNet(100, bottleneck=True, cfg=[12]*48)
    with pytest.raises(ValueError, match='`cardinality`'): CifarResNeXt(29, cfg=[[512, 500]]*9)
    with pytest.raises(ValueError, match='`arch`'): make_model('no_such_net')
    with pytest.raises(TypeError, match='`model`'): model_widths(nn.Conv2d(1, 1, 1))

# --- widths: shrink real models with torch-pruning, then rebuild from the widths -------------------------------------

SMALL = {   # one cheap member of every family (same code paths as the full-size nets)
    'vgg': lambda: CifarVGG(11),
    'resnet': lambda: CifarResNet(20),
    'resnet_bottleneck': lambda: CifarResNet(29, block='bottleneck'),
    'preresnet': lambda: CifarPreResNet(20),
    'preresnet_bottleneck': lambda: CifarPreResNet(29, block='bottleneck'),
    'densenet': lambda: CifarDenseNet(16, growth=6),
    'densenet_bc': lambda: CifarDenseNet(28, growth=6, bottleneck=True, compression=0.5),
    'resnext': lambda: CifarResNeXt(11, cardinality=4, base_width=2),
}

def shrink(model, seed=0):
    "Remove random channels from every prunable coupled group of `model` with torch-pruning (in place)"
    rng = random.Random(seed)
    x = torch.randn(1, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for group in list(dg.get_all_groups(ignored_layers=[model.classifier], root_module_types=[nn.Conv2d])):
        root = group[0].dep.target.module
        n = root.out_channels
        g = max([m.groups for m in (d.target.module for d, _ in group) if isinstance(m, nn.Conv2d)] + [1])
        if g > 1:   # a grouped conv: remove the same offsets from every group
            per = n // g
            drop = rng.sample(range(per), per // 2)
            idxs = [c*per + j for c in range(g) for j in drop]
        else: idxs = rng.sample(range(n), rng.randint(1, n - 1))
        if idxs: dg.get_pruning_group(root, tp.prune_conv_out_channels, sorted(idxs)).prune()
    return model

@pytest.mark.parametrize('family', sorted(SMALL))
def test_rebuild_from_widths_of_shrunk_model(family):
    dense = SMALL[family]()
    slim = shrink(SMALL[family]())
    assert count_params(slim) < 0.8 * count_params(dense)
    ws = model_widths(slim)
    assert ws != model_widths(dense)
    again = rebuild(slim)
    assert shapes(again) == shapes(slim)
    assert type(again) is type(slim) and model_widths(again) == ws
    with torch.no_grad(): assert again.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)

def test_rebuild_by_timm_name_after_shrinking():
    slim = shrink(timm.create_model('fastslim_resnet56_cifar', num_classes=10), seed=1)
    again = timm.create_model('fastslim_resnet56_cifar', num_classes=10, **model_widths(slim))
    assert shapes(again) == shapes(slim)
    with torch.device('meta'): vgg = timm.create_model('fastslim_vgg19_bn_cifar', cfg=[8, 'M', 16, 'M', 32])
    assert shapes(timm.create_model('fastslim_vgg19_bn_cifar', **model_widths(vgg), device='meta')) == shapes(vgg)
    assert next(timm.create_model('fastslim_vgg_tiny', device='meta', dtype=torch.float16).parameters()).dtype == torch.float16

def test_widths_round_trip_from_constructor():
    rng = random.Random(3)
    ws = dict(cfg=[[rng.randint(1, 9), rng.randint(1, 9)] for _ in range(9)], stem_width=5, stage_widths=[7, 3, 11])
    for cls in (CifarResNet, CifarPreResNet):
        with torch.device('meta'): m = cls(29, block='bottleneck', **ws)
        assert model_widths(m) == ws
    dws = dict(cfg=[rng.randint(1, 9) for _ in range(12)], stem_width=3, transition_widths=[5, 6])
    with torch.device('meta'): d = CifarDenseNet(16, **dws)
    assert model_widths(d) == dws

def test_residual_blocks_have_branch_and_shortcut():
    m = CifarPreResNet(164)
    blocks = list(residual_blocks(m).items())
    assert len(blocks) == 54
    name, b = blocks[18]
    assert name == 'features.stage2.0' and isinstance(b.shortcut, nn.Conv2d) and isinstance(b.branch, nn.Sequential)
    assert isinstance(list(residual_blocks(CifarResNet(20)).values())[1].shortcut, nn.Identity)
    # a scale on the branch output (what Sparse Structure Selection learns) changes the block as expected
    x = torch.randn(1, 64, 32, 32)
    blk = list(residual_blocks(m).values())[1].eval()
    with torch.no_grad():
        full = blk(x)
        h = blk.branch.register_forward_hook(lambda mod, inp, out: out * 0)
        assert torch.equal(blk(x), x)        # branch scaled to 0: the identity block passes its input
        h.remove()
        assert not torch.equal(blk(x), x) and torch.equal(blk(x), full)
    assert len(residual_blocks(CifarDenseNet(40))) == 0

# --- presets -------------------------------------------------------------------------------------------------------

class LRLog(Callback):
    "Record the learning rate of each epoch's first batch, then skip the rest of the epoch"
    order = ParamScheduler.order + 1
    def before_fit(self): self.lrs = []
    def before_batch(self):
        self.lrs.append(self.opt.hypers[0]['lr'])
        raise CancelEpochException()

@pytest.fixture(scope='module')
def dls32(): return local_digits(size=32, channels=3)

def run_schedule(learn, epochs=None):
    log = LRLog()
    with learn.no_bar(), learn.no_logging(): learn.fit_preset(epochs=epochs, cbs=log)
    return log.lrs

def test_slimming_preset(dls32):
    learn = slimming_preset('fastslim_vgg19_bn_cifar', dls32)
    p = learn.preset
    assert (p.epochs, p.bs, p.lr, p.wd, p.mom, p.nesterov, p.bn_init) == (160, 64, 0.1, 1e-4, 0.9, True, 0.5)
    assert dls32.bs == p.bs
    bns = [m for m in learn.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 16 and all((b.weight == 0.5).all() and (b.bias == 0).all() for b in bns)
    lrs = run_schedule(learn)                                       # the full 160 epochs, each cut after one batch
    assert len(lrs) == 160
    assert lrs[0] == lrs[79] == pytest.approx(0.1)                  # 0% .. just before 50%
    assert lrs[80] == lrs[119] == pytest.approx(0.01)               # 50% .. just before 75%
    assert lrs[120] == lrs[159] == pytest.approx(0.001)             # 75% .. end
    opt = learn.opt.opt
    assert isinstance(opt, torch.optim.SGD)
    for pg in opt.param_groups:                                     # decay on every parameter, BN included, as in the paper's code
        assert (pg['momentum'], pg['nesterov'], pg['weight_decay'], pg['dampening']) == (0.9, True, 1e-4, 0)
    assert sum(len(pg['params']) for pg in opt.param_groups) == len(list(learn.model.parameters()))

def test_slimming_preset_keeps_given_module(dls32):
    m = CifarResNet(20)
    learn = slimming_preset(m, dls32)
    assert learn.model is m and all((b.weight == 1).all() for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert learn.preset.name == 'slimming'

def test_other_presets(dls32):
    learn = resnet_preset('resnet110_cifar', dls32)
    p = learn.preset
    assert (p.epochs, p.bs, p.wd, p.nesterov, p.bn_init, p.warmup_iters) == (164, 128, 1e-4, False, None, 400)
    assert all((b.weight == 1).all() for b in learn.model.modules() if isinstance(b, nn.BatchNorm2d))
    n_iters = p.epochs * len(dls32.train)
    sched = p.lr_sched(n_iters)
    assert sched(0) == 0.01 and sched(399 / n_iters) == 0.01 and sched(400 / n_iters) == 0.1
    assert resnet_preset('resnet20_cifar', dls32).preset.warmup_iters == 0     # only the deep nets warm up
    lrs = run_schedule(resnet_preset('resnet20_cifar', dls32), epochs=8)
    assert lrs == pytest.approx([0.1]*4 + [0.01]*2 + [0.001]*2)
    d = densenet_preset('densenet40_cifar', dls32).preset
    assert (d.epochs, d.bs, d.wd, d.nesterov) == (300, 64, 1e-4, True)
    x = resnext_preset(CifarResNeXt(11, cardinality=2, base_width=4), dls32)
    assert (x.preset.epochs, x.preset.bs) == (300, 128)
    x.create_opt()
    assert all(pg['weight_decay'] == 5e-4 for pg in x.opt.opt.param_groups)

def test_preset_arguments(dls32):
    from fastai.learner import Learner
    with pytest.raises(ValueError, match='`preset`'): preset_learner('resnet20_cifar', dls32, 'adam')
    with pytest.raises(ValueError, match='preset'): Learner(dls32, vgg_tiny(in_channels=3), loss_func=nn.CrossEntropyLoss()).fit_preset()
    assert MultiStep(1., (0.5,), 0.5)(0.7) == 0.5 and MultiStep(1., (0.5,), 0.5, 0.1, 0.2)(0.1) == 0.1

def test_cifar_dls_reads_a_folder(tmp_path):
    "The CIFAR loader on a tiny folder in CIFAR's layout (no download): padded random crops of 32x32, normalised"
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ('train', 'test'):
        for c in ('cat', 'dog'):
            (tmp_path/split/c).mkdir(parents=True)
            for i in range(4): Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path/split/c/f'{i}.png')
    dls = cifar_dls(tmp_path, bs=4, num_workers=0)
    xb, yb = dls.one_batch()
    assert xb.shape == (4, 3, 32, 32) and dls.c == 2
    assert len(dls.train_ds) == len(dls.valid_ds) == 8
    assert abs(float(xb.mean())) < 2
