"""Recovery recipes after slimming on MNIST-10k: distillation fine-tuning vs plain fine-tuning vs Scratch-B.

For each net (a VGG with widths 16-128, the paper's ResNet-20 with widths 16-64) and seed: train dense, then for
each MACs target run `Learner.slim` (Network Slimming) up to the compacted network, and recover it with the same
fine-tuning epochs: KD from the original dense network (`DistillCallback`, what `Learner.slim` does), KD from the
sparsity-trained network, plain fine-tuning, and Scratch-B (fresh weights, the dense model's training compute).
Prints mean test accuracy over seeds per (net, target), and the per-seed difference distillation - plain.

    python bench/recipes.py                      # dense and fine-tuning 4 epochs, seeds 0 1: ~30 min on 2 cores
    python bench/recipes.py --epochs 6 --seeds 0 1 2
"""
import argparse, contextlib, copy, io, tempfile, time, warnings
from pathlib import Path
import torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastslim.core import count_macs
from fastslim.data import npz_dls
from fastslim.models import CifarVGG, CifarResNet
from fastslim.distill import DistillCallback
from fastslim.prune import scratch_b
from fastslim.slim import accuracy_of
import fastslim.slim  # Learner.slim

DATA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'mnist10k.npz'
NETS = {
    'vgg': lambda: CifarVGG(num_classes=10, in_channels=1, cfg=[16, 'M', 32, 'M', 64, 'M', 128]),
    'resnet20': lambda: CifarResNet(depth=20, num_classes=10, in_channels=1, stem_width=16, stage_widths=[16, 32, 64]),
}

def quiet(learn):
    from fastai.callback.progress import ProgressCallback
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, ProgressCallback)]); return learn

def run(net, seed, targets, epochs, lr, dls):
    "{target: {recipe: accuracy}} for one net and seed"
    set_seed(seed)
    dense = quiet(Learner(dls, NETS[net](), metrics=accuracy))
    dense.fit_one_cycle(epochs, lr)
    x = dls.one_batch()[0][:1]
    dense_macs = count_macs(dense.model, x)
    res = {'dense': {'acc': accuracy_of(dense)}}
    for t in targets:
        with tempfile.TemporaryDirectory() as d:
            learn = quiet(Learner(dls, copy.deepcopy(dense.model), metrics=accuracy))
            set_seed(seed)
            r = learn.slim('slimming', target_macs=t, sparse_epochs=1, prune_epochs=1, finetune_epochs=0,
                           path=d, measure_speed=False)
            sparse = copy.deepcopy(dense.model)   # the network after sparsity training: the sparse-stage checkpoint
            sparse.load_state_dict(torch.load(Path(d)/'sparse.pt', weights_only=True)['state_dict'])
        small = learn.model
        out = dict(macs=count_macs(small, x) / dense_macs, pruned=r.slim['accuracy'],
                   sparse_acc=accuracy_of(quiet(Learner(dls, sparse, metrics=accuracy))))
        for name, cbs in (('distill', [DistillCallback(copy.deepcopy(dense.model).eval())]),
                          ('distill_sparse', [DistillCallback(sparse.eval())]), ('plain', [])):
            set_seed(seed)
            ft = quiet(Learner(dls, copy.deepcopy(small), metrics=accuracy))
            ft.fit_one_cycle(epochs, lr, cbs=cbs)
            out[name] = accuracy_of(ft)
        sb = quiet(scratch_b(dls, copy.deepcopy(small), epochs, dense_macs, lr=lr, seed=seed, metrics=accuracy))
        out['scratch_b'], out['scratch_b_epochs'] = accuracy_of(sb), sb.n_epoch
        res[t] = out
    return res

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=None, help='dense and fine-tuning epochs (default 4)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--nets', nargs='+', default=list(NETS), choices=list(NETS))
    p.add_argument('--targets', type=float, nargs='+', default=[0.25, 0.1])
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args()
    epochs = a.epochs or 4
    if not DATA.exists(): raise SystemExit(f"no data at {DATA}")
    torch.set_num_threads(a.threads); warnings.simplefilter('ignore')
    dls = npz_dls(DATA, n_train=8000, bs=256)
    t0 = time.time()
    print(f"MNIST-10k (8000 train / 2000 test), slimming (sparse 1 + prune 1 epoch), dense and fine-tune {epochs} epochs, seeds {a.seeds}")
    for net in a.nets:
        with contextlib.redirect_stdout(io.StringIO()):   # fastai's per-epoch logging
            runs = [run(net, s, a.targets, epochs, a.lr, dls) for s in a.seeds]
        mean = lambda f: sum(f(r) for r in runs) / len(runs)
        print(f"\n{net}: dense acc {mean(lambda r: r['dense']['acc']):.4f}   ({time.time()-t0:.0f}s so far)")
        print(f"  {'target':>6} {'MACs':>6} {'sparse':>7} {'pruned':>7} {'distill':>8} {'KD sparse':>9} {'plain':>8} {'scratch-B':>10} {'(ep)':>5}  per-seed distill-plain")
        for t in a.targets:
            m = lambda k: mean(lambda r: r[t][k])
            diffs = ' '.join(f"{r[t]['distill']-r[t]['plain']:+.4f}" for r in runs)
            print(f"  {1/t:>5.0f}x {m('macs'):6.3f} {m('sparse_acc'):7.4f} {m('pruned'):7.4f} {m('distill'):8.4f} {m('distill_sparse'):9.4f} {m('plain'):8.4f} {m('scratch_b'):10.4f} {m('scratch_b_epochs'):5.0f}  {diffs}")
    print("sparse: the network after sparsity training; pruned: right after pruning (BN statistics only); distill: KD from"
          " the original dense network (what Learner.slim does); KD sparse: KD from the sparsity-trained network")
    print(f"\ntotal {time.time()-t0:.0f}s")

if __name__ == '__main__': main()
