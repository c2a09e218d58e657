"""Does distillation pay? Recovery recipes for one compacted student on MNIST-10k (tracker issue #20).

Per (net, seed): one dense network (`--dense` epochs, Adam 1e-2, wd 5e-4, one-cycle) is pruned once per MACs target with
`learn.slim('l1', target_macs=t, prune_epochs=0, finetune_epochs=0)` (one-shot global L1 filters, compaction, BN statistics
re-estimated), and the SAME compacted student (deep copies) is recovered by each recipe for `--finetune` epochs:

* `plain`: fine-tuning on the labels only (cross-entropy).
* `kd`: `DistillCallback(dense, T, alpha)` (Hinton logit KD from the dense network).
* `kd+match`: the same plus the channel-matched BatchNorm feature hints (`features='batchnorms', feature_loss={'match': w}`;
  the student's `slim_kept` picks the teacher's channels, no adapter).
* `rec`: `refit_to_teacher` (each conv/linear refitted in closed form to the dense network's same channels, on 4 batches
  of images, labels unused), then plain fine-tuning; `rec+kd`: `DistillCallback(dense, T, alpha, refit=True)`.
* `scratch`: the student's architecture from fresh weights (`fastslim.prune.scratch_model`), same epochs, and
  `scratch4x`: 4x the epochs. (The paper's Scratch-B, the dense training's compute, is 3*10 = 30 to 3*30 = 90 epochs here:
  not run, see the header of the results.)

Labels: with `--labels 0.1` only a class-balanced 10% of the 8,000 training images carry labels. The KD recipes see
all 8,000 images: labelled batches (x, y) and unlabelled batches (x,) shuffled together, which `DistillCallback` trains
from the teacher alone. `plain` and `scratch` see the labelled subset only, cycled so that every recipe takes the same
number of optimizer steps per epoch (63 batches of 128). The dense teacher is trained on all labels (a trained network
being compressed with few labels at hand).

    python bench/recipes.py --sweep                               # T / alpha / match-weight sweep: vgg, 30x, seed 0
    python bench/recipes.py --nets vgg --seeds 0 1 2 --json vgg.jsonl
    python bench/recipes.py --table vgg.jsonl resnet20.jsonl      # merge per-job results into the table
"""
import argparse, copy, datetime, itertools, json, math, sys, time, warnings
from pathlib import Path
import numpy as np, torch
from fastai.vision.all import Learner, accuracy, set_seed, Adam, CrossEntropyLossFlat, DataLoaders
from fastslim.core import count_macs
from fastslim.data import npz_dls
from fastslim.models import CifarVGG, CifarResNet
from fastslim.distill import DistillCallback, refit_to_teacher
from fastslim.prune import scratch_model
from fastslim.slim import accuracy_of
import fastslim.slim  # Learner.slim

DATA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'mnist10k.npz'
def _w(v, k): return max(4, int(round(v * k)))
NETS = {   # the same nets as bench/peers.py
    'vgg': lambda k: CifarVGG(num_classes=10, in_channels=1, cfg=[_w(32, k), _w(32, k), 'M', _w(64, k), _w(64, k), 'M',
                                                              _w(128, k), _w(128, k), 'M', _w(256, k)]),
    'resnet20': lambda k: CifarResNet(depth=20, num_classes=10, in_channels=1, stem_width=_w(16, k),
                                      stage_widths=[_w(16, k), _w(32, k), _w(64, k)]),
}
LR, WD, BS = 1e-2, 5e-4, 128
RECIPES = ['plain', 'kd', 'kd+match', 'rec', 'rec+kd', 'scratch', 'scratch4x']

class MixedDL:
    "Training batches of `bs`: labelled (x, y) from indices `lab`, unlabelled (x,) from `unl`, shuffled together; `n_batches` per epoch (labelled cycled)"
    def __init__(self, x, y, lab, unl=None, bs=BS, n_batches=None, seed=0):
        self.x, self.y, self.lab, self.unl, self.bs = x, y, torch.as_tensor(lab), None if unl is None else torch.as_tensor(unl), bs
        self.n_unl = 0 if self.unl is None else len(self.unl) // bs
        self.n_lab = max(1, math.ceil(len(self.lab) / bs)) if n_batches is None else n_batches - self.n_unl
        self.g, self.device = torch.Generator().manual_seed(seed), None
    def __len__(self): return self.n_lab + self.n_unl
    def to(self, device): self.device = device; return self
    def _lab_batches(self):
        "`n_lab` labelled batches: passes over the labelled subset in fresh orders, the subset cycled if it is small"
        out, cur = [], torch.empty(0, dtype=torch.long)
        per = min(self.bs, len(self.lab))
        while len(out) < self.n_lab:
            if len(cur) < per: cur = torch.cat([cur, self.lab[torch.randperm(len(self.lab), generator=self.g)]])
            out.append(cur[:per]); cur = cur[per:]
        return out
    def __iter__(self):
        bs = [(i, True) for i in self._lab_batches()]
        if self.n_unl: bs += [(i, False) for i in self.unl[torch.randperm(len(self.unl), generator=self.g)][:self.n_unl*self.bs].split(self.bs)]
        for k in torch.randperm(len(bs), generator=self.g).tolist():
            i, labelled = bs[k]
            yield (self.x[i], self.y[i]) if labelled else (self.x[i],)

def label_split(y, frac, seed):
    "A class-balanced `frac` of the indices (the labelled ones) and the rest"
    g = torch.Generator().manual_seed(1000 + seed)
    lab = []
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        lab.append(idx[torch.randperm(len(idx), generator=g)][:max(1, round(frac * len(idx)))])
    lab = torch.cat(lab).sort().values
    mask = torch.ones(len(y), dtype=torch.bool); mask[lab] = False
    return lab, mask.nonzero().flatten()

def loaders(dls, frac, seed, with_unlabelled):
    "Train loader for a recipe: labelled subset only (cycled to a full epoch of steps) or labelled + unlabelled batches"
    x, y = dls.train.dataset.tensors
    n_batches = len(x) // BS
    if frac >= 1: lab, unl = torch.arange(len(x)), None
    else: lab, unl = label_split(y, frac, seed)
    dl = MixedDL(x, y, lab, unl if with_unlabelled else None, n_batches=n_batches, seed=seed)
    d = DataLoaders(dl, dls.valid); d.c, d.n_inp = 10, 1
    return d

def learner(dls, model):
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=Adam, wd=WD)

def fit(learn, n, cbs=()):
    with learn.no_logging(): learn.fit_one_cycle(n, LR, cbs=list(cbs))
    return learn

def kd_cbs(dense, T, alpha, match, refit=False):
    fk = dict(features='batchnorms', feature_loss={'match': match}) if match else {}
    return [DistillCallback(copy.deepcopy(dense).eval(), T=T, alpha=alpha, refit=refit, **fk)]

def dense_and_students(net, seed, targets, a, dls, x):
    set_seed(seed)
    dense = fit(learner(dls, NETS[net](a.width)), a.dense).model.eval()
    dacc, dmacs, out = accuracy_of(learner(dls, dense)), count_macs(dense, x), {}
    for t in targets:
        set_seed(seed)
        l = learner(dls, copy.deepcopy(dense))
        with l.no_logging(): r = l.slim('l1', target_macs=t, prune_epochs=0, finetune_epochs=0, lr=LR, measure_speed=False)
        out[t] = (l.model.eval(), count_macs(l.model, x) / dmacs, r.slim['accuracy'])
    return dense, dacc, out

def recover(recipe, dense, small, dls, frac, seed, a, T=None, alpha=None, match=None):
    "Test accuracy of `small` (a deep copy) after `recipe`"
    set_seed(seed)
    if recipe in ('kd', 'kd+match', 'rec+kd'):
        l = learner(loaders(dls, frac, seed, True), copy.deepcopy(small))
        m = (a.match if match is None else match) if recipe == 'kd+match' else 0.
        fit(l, a.finetune, kd_cbs(dense, a.T if T is None else T, a.alpha if alpha is None else alpha, m, refit=recipe == 'rec+kd'))
    elif recipe == 'rec':   # the refit alone (on 4 batches of images, labels unused), then plain fine-tuning
        xs = [b[0] for b, _ in zip(loaders(dls, frac, seed, True).train, range(4))]
        l = fit(learner(loaders(dls, frac, seed, False), refit_to_teacher(copy.deepcopy(small), copy.deepcopy(dense).eval(), xs)), a.finetune)
    elif recipe == 'plain': l = fit(learner(loaders(dls, frac, seed, False), copy.deepcopy(small)), a.finetune)
    else:
        l = learner(loaders(dls, frac, seed, False), scratch_model(small, seed=seed))
        fit(l, a.finetune * (a.scratch_mult if recipe == 'scratch4x' else 1))
    return accuracy_of(l)

def sweep(a, dls, x):
    net, t, seed = a.nets[0], a.targets[-1], a.seeds[0]
    t0 = time.time()
    dense, dacc, st = dense_and_students(net, seed, [t], a, dls, x)
    small, macs, pr = st[t]
    print(f"# sweep: {net} width x{a.width}, dense {dacc:.4f}, target {1/t:.0f}x (MACs {macs:.3f} of dense, {pr:.4f} right after pruning), "
          f"seed {seed}, {a.finetune} fine-tuning epochs; test accuracy")
    rows = []
    for frac in a.labels:
        base = recover('plain', dense, small, dls, frac, seed, a)
        rows.append(dict(labels=frac, T='-', alpha='-', match='-', acc=base))
        print(f"labels {frac:>5}  plain                          {100*base:6.2f}", flush=True)
        for T, al, m in itertools.product(a.sweep_T, a.sweep_alpha, a.sweep_match):
            acc = recover('kd+match' if m else 'kd', dense, small, dls, frac, seed, a, T=T, alpha=al, match=m)
            rows.append(dict(labels=frac, T=T, alpha=al, match=m, acc=acc))
            print(f"labels {frac:>5}  T {T:<4} alpha {al:<4} match {m:<5}   {100*acc:6.2f}   {100*(acc-base):+6.2f} vs plain", flush=True)
    print(f"# sweep {time.time()-t0:.0f}s")

def grid(a, dls, x):
    f = open(a.json, 'a') if a.json else None
    for net in a.nets:
        for seed in a.seeds:
            t0 = time.time()
            dense, dacc, st = dense_and_students(net, seed, a.targets, a, dls, x)
            for t, (small, macs, pr) in st.items():
                for frac in a.labels:
                    for rc in a.recipes:
                        if rc == 'scratch4x' and ((frac < 1 and not a.scratch4x_all) or
                                                  (a.scratch4x_at and not any(abs(t-u) < 1e-3 for u in a.scratch4x_at))): continue
                        t1 = time.time()
                        acc = recover(rc, dense, small, dls, frac, seed, a)
                        r = dict(net=net, seed=seed, target=t, macs=macs, pruned=pr, dense=dacc, labels=frac, recipe=rc, acc=acc, s=time.time()-t1)
                        print(json.dumps(r), flush=True)
                        if f: f.write(json.dumps(r) + '\n'); f.flush()
            print(f"# {net} seed {seed}: {time.time()-t0:.0f}s", flush=True)

def table(rows):
    "mean ± std (over seeds) per (net, target, labels, recipe), per-seed KD - plain, the winner per column"
    out = []
    nets = [n for n in NETS if any(r['net'] == n for r in rows)]
    fracs = sorted({r['labels'] for r in rows}, reverse=True)
    recipes = [rc for rc in RECIPES if any(r['recipe'] == rc for r in rows)]
    diffs = [rc for rc in ('kd', 'kd+match', 'rec', 'rec+kd') if rc in recipes]   # per-seed differences against plain
    for net in nets:
        rn = [r for r in rows if r['net'] == net]
        seeds = sorted({r['seed'] for r in rn})
        out.append(f"\n{net}: dense {100*np.mean([r['dense'] for r in rn]):.2f} (mean of seeds {seeds}); test accuracy %, mean ± std over seeds")
        out.append(f"{'target':>7} {'MACs':>6} {'pruned':>7} {'labels':>6}  " + ''.join(f"{rc:>14}" for rc in recipes)
                   + "   winner      " + '   '.join(f"{rc}-plain per seed" for rc in diffs))
        for t in sorted({r['target'] for r in rn}, reverse=True):
            rt = [r for r in rn if r['target'] == t]
            for frac in fracs:
                rf = [r for r in rt if r['labels'] == frac]
                if not rf: continue
                acc = {rc: {r['seed']: r['acc'] for r in rf if r['recipe'] == rc} for rc in recipes}
                n = len({r['seed'] for r in rf})
                cell = lambda v: (f"{'-':>13}" if not v else f"{100*np.mean(v):>7.2f}±{100*np.std(v):<5.2f}" if len(v) == n
                                  else f"{100*np.mean(v):>7.2f} (n={len(v)})")
                means = {rc: np.mean(list(v.values())) for rc, v in acc.items() if len(v) == n}   # the winner among complete cells
                win = max(means, key=means.get)
                d = lambda rc: ' '.join(f"{100*(acc[rc][s]-acc['plain'][s]):+5.2f}" for s in seeds if s in acc.get(rc, {}) and s in acc['plain'])
                dm = lambda rc: (f" (mean {100*(means[rc]-means['plain']):+.2f})" if rc in means and 'plain' in means else '')
                out.append(f"{1/t:>6.0f}x {np.mean([r['macs'] for r in rf]):6.3f} {100*np.mean([r['pruned'] for r in rf]):7.2f} {frac:>6g}  "
                           + ''.join(f"{cell(list(acc[rc].values())):>14}" for rc in recipes)
                           + f"   {win:10}  " + '   '.join(f"{d(rc)}{dm(rc)}" for rc in diffs))
    return '\n'.join(out)

def setup(threads):
    if not DATA.exists(): raise SystemExit(f"no data at {DATA}")
    torch.set_num_threads(threads); warnings.simplefilter('ignore')
    from fastai.basics import defaults
    from fastai.callback.progress import ProgressCallback
    defaults.callbacks = [c for c in defaults.callbacks if c is not ProgressCallback]
    dls = npz_dls(DATA, n_train=8000, bs=BS)
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  python {' '.join(sys.argv)}", flush=True)
    return dls, dls.one_batch()[0][:1].cpu()

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--nets', nargs='+', default=list(NETS), choices=list(NETS))
    p.add_argument('--targets', type=float, nargs='+', default=[0.1, 1/30])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--labels', type=float, nargs='+', default=[1., 0.1, 0.01], help='fractions of the train set with labels')
    p.add_argument('--recipes', nargs='+', default=RECIPES, choices=RECIPES)
    p.add_argument('--width', type=float, default=0.5, help='multiplier of every layer width')
    p.add_argument('--dense', type=int, default=3, help='dense epochs')
    p.add_argument('--finetune', type=int, default=2, help='recovery epochs (63 steps of 128 each)')
    p.add_argument('--scratch_mult', type=int, default=4)
    p.add_argument('--scratch4x_all', action='store_true', help='scratch4x at every label fraction (default: full labels only)')
    p.add_argument('--scratch4x_at', type=float, nargs='+', help='scratch4x only at these targets (default: all)')
    p.add_argument('--T', type=float, default=4.); p.add_argument('--alpha', type=float, default=0.5)
    p.add_argument('--match', type=float, default=1., help="weight of the channel-matched hints in kd+match")
    p.add_argument('--sweep', action='store_true', help='T x alpha x match sweep on the first net, last target, first seed')
    p.add_argument('--sweep_T', type=float, nargs='+', default=[1., 4.])
    p.add_argument('--sweep_alpha', type=float, nargs='+', default=[0.5, 0.9])
    p.add_argument('--sweep_match', type=float, nargs='+', default=[0., 1., 10.])
    p.add_argument('--json', help='append one JSON line per result to this file')
    p.add_argument('--table', nargs='+', help='print the table of these JSON-lines files and exit')
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    if a.table:
        print(table([json.loads(l) for f in a.table for l in open(f) if l.strip()])); return
    dls, x = setup(a.threads)
    (sweep if a.sweep else grid)(a, dls, x)

if __name__ == '__main__': main()
