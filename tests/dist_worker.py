"""One process of the multi-process tests (tests/test_distributed.py): launched twice by `torch.distributed.run`
(gloo on the CPU), or once alone for the single-process reference. Every scenario writes what this rank ended with
to `OUT/<scenario>.<rank>.pt`; the test compares the ranks with each other and with the single process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT DENSE scenario...
    python tests/dist_worker.py OUT DENSE scenario...

DENSE is a state dict of `digits_cnn()` trained by the test; every scenario starts from it. fastai's `DistributedDL`
gives each rank whole batches of its share of the data, so the ranks together step on `BS` samples: the single process
gets batches of `BS` for the same number of steps."""
import os, sys, warnings
from pathlib import Path
import torch
torch.set_num_threads(1)
from fastai.vision.all import *
import fastai.distributed   # `learn.distrib_ctx`; on CPU processes fastslim.distrib lets its loaders shuffle under gloo
from fastslim.all import *
from fastslim.distrib import rank, world_size, distributed
from fastslim.test_utils import digits_cnn
from copy import deepcopy   # after the star imports: fastai exports a `copy` of its own

OUT, DENSE, SCENARIOS = Path(sys.argv[1]), torch.load(sys.argv[2]), sys.argv[3:]
BS = 128   # samples per optimizer step, over all ranks
warnings.filterwarnings('ignore')

def learner(model=None, seed=0, bs=None):
    "A learner on the dense network, with the same data order on every rank (and in the single process)"
    set_seed(seed)   # python's `random` too: fastai's loaders shuffle with it
    if model is None: model = digits_cnn(); model.load_state_dict(DENSE)
    bs = bs or BS // int(os.environ.get('WORLD_SIZE', 1))
    return Learner(digits_dls(bs=bs), model, metrics=accuracy, opt_func=partial(SGD, mom=0.9))

def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}
def save(name, **kw): torch.save(kw, OUT/f'{name}.{rank()}.pt')

def shard(batches):
    "This rank's share of each batch, as fastai's `DistributedDL` splits one: a contiguous slice per rank"
    n, r = world_size(), rank()
    return [tuple(t[r*len(t)//n:(r+1)*len(t)//n] for t in b) for b in batches]

def scores():
    "Raw scores of the data-driven criteria on the same 3 batches, each rank holding its half of every batch"
    learn = learner(bs=64)
    batches = [tuple(plain(t) for t in b) for b in list(learn.dls.train)[:3]]
    plan = SlimPlan(learn.model, example_batch(learn.dls))
    with learn.distrib_ctx(sync_bn=False, cpu=True):   # a process group of the ranks, as during a distributed fit
        res = {c: get_criterion(c, n_batches=3, **kw).scores(plan, shard(batches))
               for c, kw in [('taylor', dict(loss_func=CrossEntropyLossFlat())), ('thinet', dict(n_samples=10**6)),
                             ('regression', dict(n_samples=10**6))]}
    save('scores', scores=res)

def fit():
    "`learn.fit` with PruneCallback (L1, one-shot, compacted at the end) and DistillCallback from the dense network"
    learn = learner()
    teacher = deepcopy(learn.model)
    cbs = [PruneCallback(target_macs=0.5, criterion='l1', compact_at_end=True), DistillCallback(teacher)]
    with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(2, 0.02, cbs=cbs)
    save('fit', state=state(learn.model), accuracy=top1(learn.model, learn.dls), wrapped=type(learn.model).__name__,
         teacher_grads=[p.grad is not None for p in teacher.parameters()],
         teacher_same=all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), DENSE.values())))

def iterative():
    "PruneCallback with a data-driven criterion (Taylor) on an AGP schedule during a distributed fit, compacted at the end"
    learn = learner()
    cb = PruneCallback(ratio=0.5, criterion='taylor', schedule='agp', n_steps=3, start=0., end=0.75, compact_at_end=True)
    with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(2, 0.02, cbs=cb)
    save('iterative', state=state(learn.model), log=cb.log, n_iter=2 * -(-len(learn.dls.train) // world_size()))

CRITERIA = {'l1': 'one-shot', 'fpgm': 'iterative', 'slimming': 'agp', 'sfp': 'one-shot', 'taylor': 'iterative',
            'thinet': 'one-shot', 'regression': 'agp'}

def criteria():
    "PruneCallback with every channel criterion, each on a schedule, during a one-epoch distributed fit"
    res = {}
    for crit, sched in CRITERIA.items():
        learn = learner()
        cb = PruneCallback(ratio=0.4, criterion=crit, schedule=sched, n_steps=2, start=0., end=0.5, compact_at_end=True)
        with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1, 0.02, cbs=cb)
        res[crit] = state(learn.model)
    save('criteria', **res)

def images():
    "fastai's own image path: `ImageDataLoaders` from a folder (TensorImage batches), a timm ResNet, fastai's default Adam"
    import timm
    set_seed(0)
    dls = ImageDataLoaders.from_folder(OUT.parent/'images', valid_pct=0.2, seed=0, item_tfms=Resize(32), bs=32, num_workers=0)
    learn = Learner(dls, timm.create_model('resnet18', num_classes=10), metrics=accuracy)
    cb = PruneCallback(target_macs=0.5, criterion='l1', compact_at_end=True)
    with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1, 1e-3, cbs=[cb, DistillCallback()])
    save('images', state=state(learn.model), batch=type(dls.one_batch()[0]).__name__)

def sparse():
    "Budget-steered SparsityCallback (BatchNorm scales and group lasso), then unstructured pruning with MaskCallback"
    res = {}
    for target in ('bn', 'groups'):
        learn = learner()
        with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1, 0.02, cbs=SparsityCallback(target=target, target_macs=0.5))
        res[target] = state(learn.model)
    learn = learner()
    cb = PruneCallback(ratio=0.6, granularity='weight', criterion='magnitude')
    with learn.distrib_ctx(sync_bn=False, cpu=True):
        learn.fit(1, 0.02, cbs=cb)
        learn.fit(1, 0.01, cbs=MaskCallback(cb.plan))
    res['weights'] = state(learn.model)
    save('sparse', **res)

def blocks():
    "BlockSparsityCallback (Sparse Structure Selection) steered to a block budget on a small residual network"
    set_seed(0)
    learn = learner(CifarResNet(depth=8, in_channels=1, stage_widths=[8, 16, 16], stem_width=8))
    with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1, 0.02, cbs=BlockSparsityCallback(ratio=0.34))
    save('blocks', state=state(learn.model))

def slim():
    "`learn.slim` with checkpoints in OUT/run, then the same run resumed (every stage found done)"
    learn = learner()
    kw = dict(target_macs=0.5, sparse_epochs=1, prune_epochs=1, finetune_epochs=1, lr=0.02, measure_speed=False, path=OUT/'run')
    with learn.distrib_ctx(sync_bn=False, cpu=True): report = learn.slim('slimming', **kw)
    again = learner()
    with again.distrib_ctx(sync_bn=False, cpu=True): resumed = again.slim('slimming', resume=True, **kw)
    save('slim', state=state(learn.model), resumed=state(again.model), stages=report.stages,
         files=sorted(p.name for p in (OUT/'run').iterdir()))

for s in SCENARIOS: globals()[s]()
print(f'rank {rank()} of {world_size()}: {" ".join(SCENARIOS)} done', flush=True)
