"fastslim in the workflows fastai users run: image folders, `ImageDataLoaders`/`DataBlock` batches (`TensorImage`), timm and torchvision models, `learn.export`/`load_learner`, the CLI on a folder, ONNX export of its output."
import copy, json, pickle, warnings
import pytest, torch, timm, torchvision
from torch import nn
from torch.utils.data import DataLoader as TorchDL, TensorDataset
from fastai.vision.all import (ImageDataLoaders, DataBlock, ImageBlock, CategoryBlock, get_image_files, parent_label,
                               RandomSplitter, Resize, aug_transforms, Learner, DataLoaders, accuracy, load_learner,
                               TensorImage, CrossEntropyLossFlat)
from fastslim.core import example_batch, split_batch, count_macs
from fastslim.data import digits_folder, digits_dls
from fastslim.plan import SlimPlan, plan_of
from fastslim.prune import PruneCallback
from fastslim.distill import DistillCallback
from fastslim.cli import main
import fastslim.slim  # Learner.slim, Learner.export
import fastslim.models  # registers the zoo with timm

warnings.filterwarnings('ignore', category=UserWarning)

@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "30 digits per class as 32x32 PNGs in fastai's folder layout"
    return digits_folder(tmp_path_factory.mktemp('digits')/'png', size=32, per_class=30)

def folder_dls(folder, bs=32):
    return ImageDataLoaders.from_folder(folder, valid_pct=0.2, seed=0, item_tfms=Resize(32), bs=bs, num_workers=0)

def block_dls(folder, bs=32):
    "A `DataBlock` with fastai's augmentations on: the other way users build image data"
    db = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                   splitter=RandomSplitter(0.2, seed=0), item_tfms=Resize(32), batch_tfms=aug_transforms(size=32, max_rotate=5))
    return db.dataloaders(folder, bs=bs, num_workers=0)

MODELS = {
    'timm/resnet18': lambda: timm.create_model('resnet18', num_classes=10),
    'timm/mobilenetv3_small_100': lambda: timm.create_model('mobilenetv3_small_100', num_classes=10),
    'timm/convnext_atto': lambda: timm.create_model('convnext_atto', num_classes=10),
    'timm/efficientnet_b0': lambda: timm.create_model('efficientnet_b0', num_classes=10),
    'tv/mobilenet_v3_small': lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    'tv/resnet18': lambda: torchvision.models.resnet18(num_classes=10),
    'zoo/fastslim_resnet20_cifar': lambda: timm.create_model('fastslim_resnet20_cifar', num_classes=10, in_chans=3),
}

def quiet(learn): return learn.no_bar(), learn.no_logging()

# ---- defect 1: fastai's tensor subclasses

def test_tensor_image_example_prunes_like_a_plain_tensor():
    "A `TensorImage` example gives the same plan and selection as the plain tensor (it left every group unpruned)"
    x = torch.randn(2, 3, 32, 32)
    kept = []
    for ex in (x, TensorImage(x)):
        torch.manual_seed(0)
        plan = SlimPlan(timm.create_model('resnet18', num_classes=10), ex)
        plan.select(plan.l1_scores(), ratio=0.5)
        assert not plan.skipped, plan.skipped
        kept.append([g.n_keep for g in plan.groups])
    assert kept[0] == kept[1] and sum(kept[0]) < sum(g.size for g in plan.groups)
    assert type(plan.example[0]) is torch.Tensor

def test_tensor_image_target_macs(folder):
    "`target_macs` on `ImageDataLoaders` batches reaches the budget on a timm ResNet (it crashed)"
    dls = folder_dls(folder)
    assert isinstance(dls.one_batch()[0], TensorImage)
    learn = Learner(dls, timm.create_model('resnet18', num_classes=dls.c), metrics=accuracy)
    cb = PruneCallback(target_macs=0.5, criterion='fpgm')
    plan = cb.prune_now(learn)
    x = example_batch(dls, 1)
    assert 0.4 <= count_macs(plan.compact(), x) / count_macs(MODELS['timm/resnet18'](), x) <= 0.55

# ---- defect 2: one example batch, as fastai splits it

def test_example_batch_follows_fastai_n_inp():
    "Plain torch loaders have no `n_inp`: fastai's fallback (all items but the last) is what `example_batch` takes"
    x1, x2, y = torch.randn(8, 3), torch.randn(8, 5), torch.randint(0, 2, (8,))
    dls = DataLoaders(TorchDL(TensorDataset(x1, x2, y), batch_size=4), TorchDL(TensorDataset(x1, x2, y), batch_size=4))
    xs = example_batch(dls)
    assert [o.shape for o in xs] == [(2, 3), (2, 5)]
    assert split_batch((x1, y))[0][0] is x1 and len(split_batch((x1,))[0]) == 1

class TwoInputs(nn.Module):
    "Two image inputs, concatenated along the channels"
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    def forward(self, x1, x2): return self.head(torch.cat([self.a(x1), self.b(x2)], 1))

def plain_loaders(n_inputs=1):
    "digits as ordinary torch `DataLoader`s wrapped in fastai `DataLoaders` (no `n_inp`, no `one_batch`)"
    d = digits_dls(bs=64)
    def dl(ds, shuffle):
        x, y = ds.tensors
        return TorchDL(TensorDataset(*([x] * n_inputs), y), batch_size=64, shuffle=shuffle)
    return DataLoaders(dl(d.train_ds, True), dl(d.valid_ds, False))

def test_distill_and_prune_on_plain_dataloaders():
    "`DistillCallback` and `PruneCallback` on plain torch loaders, with a two-input model planned on both inputs"
    dls = plain_loaders(2)
    assert not hasattr(dls, 'n_inp') or dls.n_inp is None
    learn = Learner(dls, TwoInputs(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    teacher = TwoInputs()
    cb = PruneCallback(ratio=0.5)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=[cb, DistillCallback(teacher)])
    assert len(cb.plan.example) == 2
    assert sum(g.n_keep for g in cb.plan.groups) < sum(g.size for g in cb.plan.groups)

def test_slim_on_plain_dataloaders():
    "`learn.slim` with distillation runs to the end on plain `DataLoaders` (its last stage crashed)"
    dls = plain_loaders(1)
    learn = Learner(dls, timm.create_model('fastslim_vgg_tiny', num_classes=10), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    r = learn.slim('l1', target_macs=0.5, prune_epochs=0, finetune_epochs=1, measure_speed=False)
    assert 1.7 < r.ratios()['macs'] < 2.6 and r.slim['accuracy'] > 0.5

# ---- defect 3: learn.export / load_learner

def test_export_round_trips_masks_mid_run(folder, tmp_path):
    "A learner exported with `PruneCallback` attached, after pruning, loads with its masks and keeps them in a later fit"
    dls = digits_dls()
    cb = PruneCallback(ratio=0.5)
    learn = Learner(dls, timm.create_model('fastslim_vgg_tiny', num_classes=10), metrics=accuracy, cbs=[cb], path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    kept = [g.n_keep for g in cb.plan.groups]
    learn.export('mid.pkl')
    assert learn.opt is not None and len(learn.dls.train) > 0          # the learner is usable after the export
    l2 = load_learner(tmp_path/'mid.pkl')
    x = example_batch(dls)
    with torch.no_grad(): assert torch.allclose(l2.model.eval()(*x), learn.model.eval()(*x), atol=1e-5)
    l2.dls = dls
    with l2.no_bar(), l2.no_logging(): l2.fit(1, 1e-2)
    cb2 = next(c for c in l2.cbs if isinstance(c, PruneCallback))
    assert [g.n_keep for g in cb2.plan.groups] == kept                 # the masks came back and stayed

def test_failed_export_leaves_learner_and_file(tmp_path):
    "When pickling fails, the learner keeps its data and optimizer and the older export is untouched"
    dls = digits_dls()
    learn = Learner(dls, timm.create_model('fastslim_vgg_tiny', num_classes=10), metrics=accuracy, path=tmp_path)
    learn.create_opt()
    (tmp_path/'export.pkl').write_bytes(b'old')
    learn.model.unpicklable = lambda: None        # a lambda on the model cannot be pickled
    dls0, opt0 = learn.dls, learn.opt
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)): learn.export()
    assert learn.dls is dls0 and learn.opt is opt0
    assert (tmp_path/'export.pkl').read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['export.pkl']

# ---- the realistic suite: every model, learn.slim with two methods, export before and after

@pytest.mark.parametrize('name', list(MODELS))
def test_models_on_image_folder(name, folder, tmp_path):
    "Each model on `ImageDataLoaders` batches: export before, slim to half the MACs, export after, same outputs loaded"
    dls = folder_dls(folder)
    learn = Learner(dls, MODELS[name](), metrics=accuracy, path=tmp_path)
    learn.export('before.pkl')
    assert load_learner(tmp_path/'before.pkl') is not None
    dense_macs = count_macs(learn.model, example_batch(dls, 1))
    r = learn.slim('l1', target_macs=0.5, prune_epochs=0, finetune_epochs=1, measure_speed=False, lr=1e-3)
    macs = count_macs(learn.model, example_batch(dls, 1))
    assert macs < 0.6 * dense_macs, (name, macs / dense_macs)
    learn.export('after.pkl')
    l2 = load_learner(tmp_path/'after.pkl')
    x = example_batch(dls)
    with torch.no_grad(): assert torch.allclose(l2.model.eval()(*x), learn.model.eval()(*x), atol=1e-4)

@pytest.mark.parametrize('name', list(MODELS))
def test_second_method_on_datablock(name, folder):
    "A second method on `DataBlock` batches with augmentations reaches its MACs budget: Network Slimming (a sparsity stage first), FPGM where there is no BatchNorm"
    dls = block_dls(folder)
    learn = Learner(dls, MODELS[name](), metrics=accuracy)
    method = 'fpgm' if 'convnext' in name else 'slimming'   # ConvNeXt normalises with LayerNorm: no BatchNorm scale to slim
    r = learn.slim(method, target_macs=0.5, sparse_epochs=1 if method == 'slimming' else 0, prune_epochs=0, finetune_epochs=1,
                   measure_speed=False, lr=1e-3)
    assert 1.6 < r.ratios()['macs'] < 2.6, (name, r.ratios())
    assert [s['stage'] for s in r.stages][:2] == (['dense', 'sparse'] if method == 'slimming' else ['dense', 'pruned (BN stats only)'])

# ---- defects 4 and 5: the CLI on an image folder, and exporting what it wrote

# One arch per way the CLI resolves `--arch`: the default (a fastslim timm model), a timm name that torchvision also has,
# a torchvision-only name and an explicit `torchvision/` prefix. Every model family's own slim-and-export on image
# batches is `test_models_on_image_folder` above.
@pytest.mark.parametrize('arch', ['fastslim_vgg_tiny', 'resnet18', 'mobilenet_v3_small', 'torchvision/resnet18'])
def test_cli_on_folder_then_export(arch, folder, tmp_path, capsys):
    "`fastslim slim --data <folder>` (default and timm/torchvision archs), then `fastslim export` of its output; ONNX accuracy as PyTorch's"
    out = tmp_path/'out'
    rc = main(['slim', '--data', str(folder), '--arch', arch, '--method', 'l1', '--target-macs', '0.5', '--dense-epochs', '1',
               '--prune-epochs', '0', '--finetune-epochs', '1', '--size', '32', '--out', str(out)])
    assert rc == 0, capsys.readouterr().err
    log = capsys.readouterr().out
    assert '█' not in log and 'stage 3/3' in log          # one line per epoch when stdout is not a terminal
    meta = json.loads((out/'meta.json').read_text())
    assert meta['arch'] == arch and ('in_chans' in meta['kwargs']) == (timm.is_model(arch) and not arch.startswith('torchvision/'))
    rc = main(['export', str(out), '--data', str(folder)])
    assert rc == 0, capsys.readouterr().err
    from fastslim.export import load_model_dir, torch_accuracy, onnx_accuracy
    net = load_model_dir(out)
    dls = folder_dls(folder)
    assert onnx_accuracy(out/'model.onnx', dls.valid) == pytest.approx(torch_accuracy(net, dls.valid), abs=1e-9)

# ---- defect 6: reports that say what happened

def test_report_shows_sparsity_and_reg():
    "Unstructured pruning reports its zero weights and sparse size; the report records the `reg` used; no sparse row without a sparsity stage"
    dls = digits_dls()
    learn = Learner(dls, timm.create_model('fastslim_vgg_tiny', num_classes=10), metrics=accuracy)
    r = learn.slim('magnitude', ratio=0.8, prune_epochs=0, finetune_epochs=1, measure_speed=False)
    assert r.slim['sparsity'] > 0.7 and r.ratios()['sparse_size'] > 2
    assert r.slim['size'] <= r.dense['size'] * 1.01     # the masks are not counted as part of the deployed file
    rows = {a: d for a, b, c, d in r.rows()}
    assert 'zero weights' in rows and 'sparse file size' in rows
    assert 'sparse' not in [s['stage'] for s in r.stages]
    learn = Learner(dls, timm.create_model('fastslim_vgg_tiny', num_classes=10), metrics=accuracy)
    r = learn.slim('slimming', target_macs=0.5, sparse_epochs=1, prune_epochs=0, finetune_epochs=0, measure_speed=False)
    assert r.settings['reg'] is not None and 'zero weights' not in {a for a, *_ in r.rows()}

def test_export_with_block_sparsity(tmp_path):
    "`learn.export` after `BlockSparsityCallback` added branch scales the optimizer does not hold (fastai's own export asserted)"
    from fastslim.sparsity import BlockSparsityCallback
    from fastslim.models import CifarResNet
    learn = Learner(digits_dls(), CifarResNet(depth=14, in_channels=1, stem_width=8, stage_widths=[8, 16, 32]), metrics=accuracy,
                    cbs=[BlockSparsityCallback(ratio=0.5)], path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    opt = learn.opt
    learn.export()
    assert learn.opt is opt
    l2 = load_learner(tmp_path/'export.pkl')
    x = example_batch(learn.dls)
    with torch.no_grad(): assert torch.allclose(l2.model.eval()(*x), learn.model.eval()(*x), atol=1e-5)

def test_export_with_mask_callback_keeps_masks(tmp_path):
    "A learner holding `MaskCallback` exports, loads, and keeps its masked channels at zero in a later fit"
    from fastslim.prune import MaskCallback
    dls = digits_dls()
    m = timm.create_model('fastslim_vgg_tiny', num_classes=10)
    plan = SlimPlan(m, example_batch(dls)); plan.select(plan.l1_scores(), ratio=0.5)
    learn = Learner(dls, m, metrics=accuracy, cbs=[MaskCallback(plan)], path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    learn.export()
    l2 = load_learner(tmp_path/'export.pkl'); l2.dls = dls
    with l2.no_bar(), l2.no_logging(): l2.fit(1, 1e-2)
    cb = next(c for c in l2.cbs if isinstance(c, MaskCallback))
    assert [g.n_keep for g in cb.plan.groups] == [g.n_keep for g in plan.groups]
    for g in cb.plan.groups:
        w = g.root.weight.detach()
        assert bool((w[~g.keep] == 0).all()) and bool((w[g.keep] != 0).any())

def test_prune_callback_without_prunable_groups_is_a_clear_error():
    "A model with no channel group gives one error naming the model, before any weight changes"
    learn = Learner(digits_dls(), nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), loss_func=CrossEntropyLossFlat())
    sd = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='no channel group'): PruneCallback(ratio=0.5).prune_now(learn)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in sd.items())

def test_distill_refit_on_image_folder(folder):
    "`DistillCallback(refit=True)` on `ImageDataLoaders` batches with a compacted timm ResNet-18: the refit (lr 0) moves the logits toward the teacher's"
    dls = folder_dls(folder)
    torch.manual_seed(0)
    teacher = timm.create_model('resnet18', num_classes=dls.c)
    for m in teacher.modules():                                         # BatchNorm statistics of these images: cumulative averages
        if isinstance(m, nn.BatchNorm2d): m.reset_running_stats(); m.momentum = None
    with torch.no_grad(): teacher.train(); [teacher(b[0].as_subclass(torch.Tensor)) for b in dls.train]
    teacher.eval()
    x = dls.one_batch()[0]
    assert isinstance(x, TensorImage)
    plan = SlimPlan(copy.deepcopy(teacher), x[:2])
    plan.select(plan.l1_scores(), ratio=0.5, scope='local')
    student = plan.compact()
    def err(m):
        with torch.no_grad(): s, t = m.eval()(x.as_subclass(torch.Tensor)), teacher(x.as_subclass(torch.Tensor))
        return float((s - t).pow(2).mean() / t.pow(2).mean())
    def fitted(refit):                                                  # lr 0: only the refit (and BatchNorm statistics) change
        learn = Learner(dls, copy.deepcopy(student), metrics=accuracy, cbs=DistillCallback(teacher, refit=refit))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.)
        return err(learn.model)
    without, with_refit = fitted(False), fitted(True)
    assert with_refit < 0.5 * without, (without, with_refit)
