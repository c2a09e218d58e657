"""Network Slimming's sparsity stage on MNIST-10k, under SGD and Adam: how much of the network can go afterwards.

The same small CNN with BatchNorm is trained dense (x[:8000], CPU), then trained `epochs` more epochs in five ways:
plain; the paper's gradient-form penalty at its reg=1e-4; the gradient form at the rule this project used before
(25 / optimizer steps, which killed networks under SGD and did nothing under Adam); the proximal form at that same
strength; and the proximal form steered to the budget (`SparsityCallback(ratio=...)`, the default of `learn.slim`).
Each runs under SGD (momentum 0.9, Nesterov, weight decay 5e-4) and under fastai's default Adam. For each it prints
test accuracy (x[8000:]), the share of BatchNorm scales |gamma| below 1e-2, and the test accuracy after zeroing the
`ratio` lowest-|gamma| channels by one global threshold (gamma and beta set to zero), before any fine-tuning.

    python bench/sparsity.py                 # a few minutes on one core
    python bench/sparsity.py --opts adam --epochs 8
"""
import copy, datetime, time, warnings
from functools import partial
from pathlib import Path
import torch
from torch import nn
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper, Adam
from fastai.metrics import accuracy
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastslim.data import npz_dls
from fastslim.sparsity import SparsityCallback, bn_sparsity, zeroed_bn_accuracy

ROOT = Path(__file__).resolve().parents[1]

def cnn(n_out=10):
    "Four 3x3 conv-BN-ReLU layers (16 at stride 2, 32, then 32 and 64 after a max-pool), average pool, linear head"
    def cbr(ni, no, stride=1): return [nn.Conv2d(ni, no, 3, stride, padding=1, bias=False), nn.BatchNorm2d(no), nn.ReLU()]
    return nn.Sequential(*cbr(1, 16, 2), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 32), *cbr(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_out))

def validate(learn):
    with learn.no_bar(), learn.no_logging(): return float(learn.validate()[1])


OPTS = {'sgd': (partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9, nesterov=True, weight_decay=5e-4), 2e-2),
        'adam': (Adam, 1e-2)}

@call_parse
def main(
    data:str=str(ROOT.parent/'shared'/'data'/'mnist10k.npz'), # MNIST .npz (x uint8 N,28,28; y); x[:8000] trains
    epochs:int=4, # epochs of dense training, and of every sparsity run after it
    opts:str='sgd adam', # optimizers to run, of 'sgd' and 'adam'
    ratio:float=0.5, # share of all BN channels pruned by the global |gamma| threshold
    threads:int=1, # CPU threads (small convolutions gain little from more)
    seed:int=0,
):
    torch.set_num_threads(threads)
    if not Path(data).exists(): raise SystemExit(f"no data at {data}")
    print(f"# {datetime.date.today()}  python bench/sparsity.py --epochs {epochs} --opts '{opts}' --ratio {ratio} --seed {seed}")
    for opt in opts.split():
        f, lr = OPTS[opt]
        dls = npz_dls(data, n_train=8000, bs=64, seed=seed)
        steps = epochs * len(dls.train)
        set_seed(seed)
        dense = Learner(dls, cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=f)
        with dense.no_bar(), dense.no_logging(): dense.fit_one_cycle(epochs, lr)
        print(f"\n{opt}: MNIST-10k {len(dls.train_ds)} train / {len(dls.valid_ds)} test, dense {validate(dense):.4f} after {epochs} "
              f"epochs, then {epochs} more epochs ({steps} steps) at lr {lr:g}; pruning {ratio:.0%} of BN channels")
        rows = []
        for name, cb in [('plain training', None), ("paper: grad, reg 1e-4", lambda: SparsityCallback(reg=1e-4, mode='grad')),
                         ('old rule: grad, 25/steps', lambda: SparsityCallback(reg=25 / steps, mode='grad')),
                         ('prox, 25/steps', lambda: SparsityCallback(reg=25 / steps)),
                         (f'prox, steered ratio={ratio:g}', lambda: SparsityCallback(ratio=ratio))]:
            learn = Learner(dls, copy.deepcopy(dense.model), loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=f)
            set_seed(seed)
            t = time.time()
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=[cb()] if cb else None)
            rows.append((name, validate(learn), bn_sparsity(learn), zeroed_bn_accuracy(learn, ratio), time.time() - t))
        print(f"{'setting':30} {'accuracy':>9} {'|gamma|<1e-2':>13} {f'acc, {ratio:.0%} pruned':>16} {'time':>6}")
        for name, acc, near, pacc, t in rows: print(f"{name:30} {acc:9.4f} {near:13.1%} {pacc:16.4f} {t:5.0f}s")
