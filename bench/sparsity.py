"""Network Slimming on MNIST-10k: how much of the network can go after plain training and after sparsity training.

Trains the same small CNN with BatchNorm (x[:8000], CPU) three ways: plain; with `SparsityCallback` at the paper's
reg=1e-4 for a short run (the setting that fails: no gamma gets near zero); and at the reg this project recommends,
about 25 / (number of optimizer steps). For each it prints test accuracy (x[8000:]), the share of BatchNorm scales |gamma| below 1e-2, and
the test accuracy after pruning the given share of channels by one global |gamma| threshold (gamma and beta of the
pruned channels set to zero), before any fine-tuning.

    python bench/sparsity.py                 # about 2-3 minutes on two free cores
    python bench/sparsity.py --epochs 8      # longer runs (the peers' setting still fails)
"""
import time
from pathlib import Path
import torch
from torch import nn
from fastcore.script import call_parse
from fastai.learner import Learner
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


@call_parse
def main(
    data:str=str(ROOT.parent/'shared'/'data'/'mnist10k.npz'), # MNIST .npz (x uint8 N,28,28; y); x[:8000] trains
    epochs:int=4, # epochs of every run (the peers' failing setting is 4 epochs at 1e-4)
    reg:float=None, # reg for the recommended row; default the rule of thumb 25 / (optimizer steps)
    lr:float=3e-2, # one-cycle max learning rate (Adam)
    ratio:float=0.5, # share of all BN channels pruned by the global |gamma| threshold
    threads:int=1, # CPU threads (small convolutions gain little from more)
    seed:int=0,
):
    torch.set_num_threads(threads)
    if not Path(data).exists(): raise SystemExit(f"no data at {data}")
    dls = npz_dls(data, n_train=8000, bs=64, seed=seed)
    steps = epochs * len(dls.train)
    reg = reg or 25 / steps
    print(f"MNIST-10k: {len(dls.train_ds)} train / {len(dls.valid_ds)} test, {epochs} epochs = {steps} Adam steps, "
          f"lr {lr:g}, pruning {ratio:.0%} of BN channels by one global |gamma| threshold\n")
    rows = []
    for name, r in [('plain training', 0.), ("paper's reg (peers' setting)", 1e-4), ('recommended: 25 / steps', reg)]:
        dls = npz_dls(data, n_train=8000, bs=64, seed=seed)   # fresh, so every run sees the same batches
        set_seed(seed)
        cbs = [SparsityCallback(reg=r)] if r else []
        learn = Learner(dls, cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
        t = time.time()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
        rows.append((name, r, validate(learn), bn_sparsity(learn), zeroed_bn_accuracy(learn, ratio), time.time() - t))
    print(f"{'setting':30} {'reg':>7} {'accuracy':>9} {'|gamma|<1e-2':>13} {f'acc, {ratio:.0%} pruned':>16} {'time':>6}")
    for name, r, acc, near, pacc, t in rows:
        print(f"{name:30} {r:7.1e} {acc:9.4f} {near:13.1%} {pacc:16.4f} {t:5.0f}s")
    plain, peers, rec = rows
    print(f"\nrecommended vs plain: {rec[3]:.0%} vs {plain[3]:.0%} of gammas near zero; "
          f"pruning costs {rec[2]-rec[4]:+.4f} vs {plain[2]-plain[4]:+.4f} accuracy (peers' setting: {peers[2]-peers[4]:+.4f})")
