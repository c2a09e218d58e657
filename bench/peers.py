"""Side by side on MNIST-10k: fastslim's Network Slimming against the libraries users would pick instead.

Same data (x[:8000] train, x[8000:] test), same models (a conv-BN-ReLU VGG and a CIFAR-style ResNet-20 with one
input channel, widths scaled by `--width`), the same dense starting weights (trained once per net, optimizer and
seed, then shared), the same optimizer, weight decay and one-cycle schedule, and the same epoch budget after the dense
stage (`--sparse` + `--finetune` epochs) for every row. Rows:

* `tp_bnscale`: Torch-Pruning's `BNScalePruner` (Network Slimming): `regularize()` after every backward during the
  sparse epochs, one global prune to the MACs target, fine-tune.
* `tp_l1`: Torch-Pruning's `MagnitudePruner` (L1 filters, global), one-shot prune to the MACs target, fine-tune all epochs.
* `fasterai_*`: fasterai's structured `Pruner` (local / global context, its `large_final` criterion), one shot at
  the channel ratio meeting the MACs target, then fine-tuning with its `KnowledgeDistillationCallback` (`SoftTarget`);
  only when fasterai imports (`pip install -e ".[bench]"`), else reported as not run.
* `fs_slimming`: `learn.slim('slimming', target_macs=t)` at its defaults (a budget-steered proximal L1 stage,
  the global BN-scale threshold, BatchNorm statistics re-estimated, compaction, distillation from the dense network).
* `fs_slimming_sV` (with `--settle V ...`): the same with `sparsity_kw=dict(settle=V)`, the sparsity stage's share in
  which the removed channels are held at zero (measured against the default in one run).
* `fs_l1`: `learn.slim('l1', target_macs=t)`: one-shot L1 at the start, then distillation fine-tuning for all epochs.
* `scratch_b`: the `fs_slimming` architecture from fresh weights for the dense run's compute (`fastslim.prune.scratch_b`).

Columns: accuracy after each stage (sparse, right after pruning with BN statistics re-estimated and no gradient
step, final), mean and spread (max - min) over seeds, parameters, MACs, MACs / target, CPU latency (batch 1, one
thread) and CPU seconds of the row.

    python bench/peers.py                                   # the full grid: 2 nets x 2 optimizers x 3 targets x 2 seeds
    python bench/peers.py --nets vgg --opts sgd adam --targets 0.1 --seeds 0 --width 0.5
"""
import argparse, copy, datetime, json, time, warnings, sys
from functools import partial
from pathlib import Path
import numpy as np, torch
from fastai.vision.all import Learner, accuracy, set_seed, Adam, OptimWrapper, Callback
from fastslim.core import count_macs, count_params, cpu_latency
from fastslim.data import npz_dls
from fastslim.models import CifarVGG, CifarResNet
from fastslim.sparsity import sparsity_callback, bn_layers
from fastslim.prune import PruneCallback, recalibrate_bn, scratch_b
from fastslim.distill import DistillCallback
from fastslim.slim import accuracy_of

DATA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'mnist10k.npz'
def _w(v, k): return max(4, int(round(v * k)))
NETS = {
    'vgg': lambda k: CifarVGG(num_classes=10, in_channels=1, cfg=[_w(32, k), _w(32, k), 'M', _w(64, k), _w(64, k), 'M',
                                                              _w(128, k), _w(128, k), 'M', _w(256, k)]),
    'resnet20': lambda k: CifarResNet(depth=20, num_classes=10, in_channels=1, stem_width=_w(16, k),
                                 stage_widths=[_w(16, k), _w(32, k), _w(64, k)]),
}
OPTS = {'sgd': (partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9, nesterov=True, weight_decay=5e-4), 0.02, None),
        'adam': (Adam, 1e-2, 5e-4)}

def learner(dls, model, opt):
    f, lr, wd = OPTS[opt]
    l = Learner(dls, model, metrics=accuracy, opt_func=f, **({} if wd is None else dict(wd=wd)))
    from fastai.callback.progress import ProgressCallback
    l.remove_cbs([c for c in l.cbs if isinstance(c, ProgressCallback)])
    return l

def fit(learn, n, opt, cbs=()):
    if n:
        with learn.no_logging(): learn.fit_one_cycle(n, OPTS[opt][1], cbs=list(cbs))
    return learn

def tp_prune_to(model, x, target, make):
    "Prune a copy of `model` with the Torch-Pruning pruner `make(model, ratio)` at the channel ratio meeting `target` MACs"
    dense, lo, hi, best = count_macs(model, x), 0., 0.95, None
    for _ in range(9):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model); p = make(m, mid); p.step()
        r = count_macs(m, x) / dense
        if r <= target * 1.02: hi, best = mid, m
        else: lo = mid
    if best is None: best = copy.deepcopy(model); p = make(best, hi); p.step()
    return best

class TPReg(Callback):
    "Torch-Pruning's sparsity training: `pruner.regularize(model)` after the backward pass"
    order = 10.5
    def __init__(self, pruner): self.pruner = pruner
    def before_step(self): self.pruner.regularize(self.model)

def row(name, dls, dense, small, x, t, opt, epochs, accs, t0, extra=None):
    return dict(row=name, **accs, params=count_params(small), macs=count_macs(small, x),
                macs_vs_target=count_macs(small, x) / (t * count_macs(dense, x)), latency_ms=1e3 * cpu_latency(small, x, n=10),
                cpu_s=time.process_time() - t0, **(extra or {}))

def run_one(net, opt, seed, targets, a, dls, x):
    set_seed(seed)
    dense = fit(learner(dls, NETS[net](a.width), opt), a.dense, opt).model.eval()
    dacc = accuracy_of(learner(dls, dense, opt))
    out = [dict(row='dense', net=net, opt=opt, seed=seed, target=1., final=dacc, params=count_params(dense),
                macs=count_macs(dense, x), macs_vs_target=1., latency_ms=1e3 * cpu_latency(dense, x, n=10), cpu_s=0.)]
    total = a.sparse + a.finetune
    import torch_pruning as tp
    for t in targets:
        base = dict(net=net, opt=opt, seed=seed, target=t)
        rows = set(a.rows)
        def slimming(name, **kw):
            "learn.slim('slimming') on a copy of the dense network: its row and the compacted model"
            t0 = time.process_time(); set_seed(seed)
            l = learner(dls, copy.deepcopy(dense), opt)
            with l.no_logging():
                r = l.slim('slimming', target_macs=t, sparse_epochs=a.sparse, prune_epochs=0, finetune_epochs=a.finetune,
                           lr=OPTS[opt][1], measure_speed=False, **kw)
            st = {s['stage']: s['accuracy'] for s in r.stages}
            return {**base, **row(name, dls, dense, l.model, x, t, opt, total,
                                  dict(sparse=st['sparse'], pruned=st['pruned (BN stats only)'], final=st['finetune']), t0)}, l.model
        if 'fs_slimming' in rows or 'scratch_b' in rows:
            r, small = slimming('fs_slimming')
            small_arch = copy.deepcopy(small)
            if 'fs_slimming' in rows: out.append(r)
            if 'scratch_b' in rows:
                t0 = time.process_time()
                sb = scratch_b(dls, small_arch, a.dense, count_macs(dense, x), lr=OPTS[opt][1], seed=seed, metrics=accuracy,
                               opt_func=OPTS[opt][0], **({} if OPTS[opt][2] is None else dict(wd=OPTS[opt][2])))
                out.append({**base, **row('scratch_b', dls, dense, sb.model, x, t, opt, sb.n_epoch, dict(final=accuracy_of(sb)), t0,
                                          dict(epochs=sb.n_epoch))})
        for v in a.settle:   # the same row with another `settle` of the sparsity stage (its default is the fs_slimming row)
            out.append(slimming(f'fs_slimming_s{v:g}', sparsity_kw=dict(settle=v))[0])
        if 'fs_l1' in rows:
            t0 = time.process_time(); set_seed(seed)
            l = learner(dls, copy.deepcopy(dense), opt)
            with l.no_logging(): r = l.slim('l1', target_macs=t, prune_epochs=0, finetune_epochs=total, lr=OPTS[opt][1], measure_speed=False)
            st = {s['stage']: s['accuracy'] for s in r.stages}
            out.append({**base, **row('fs_l1', dls, dense, l.model, x, t, opt, total, dict(pruned=st['pruned (BN stats only)'], final=st['finetune']), t0)})
        if 'tp_bnscale' in rows:
            t0 = time.process_time(); set_seed(seed)
            m = copy.deepcopy(dense)
            mk = lambda mm, r: tp.pruner.BNScalePruner(mm, x, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                                       pruning_ratio=r, reg=a.tp_reg, ignored_layers=[mm.head] if hasattr(mm, 'head') else [_last_linear(mm)])
            l = learner(dls, m, opt); fit(l, a.sparse, opt, [TPReg(mk(m, 0.5))]); sp = accuracy_of(l)
            small = tp_prune_to(l.model, x, t, mk); recalibrate_bn(small, dls.train)
            l = learner(dls, small, opt); pr = accuracy_of(l); fit(l, a.finetune, opt)
            out.append({**base, **row('tp_bnscale', dls, dense, l.model, x, t, opt, total, dict(sparse=sp, pruned=pr, final=accuracy_of(l)), t0)})
        if 'tp_l1' in rows:
            t0 = time.process_time(); set_seed(seed)
            mk = lambda mm, r: tp.pruner.MagnitudePruner(mm, x, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
                                                         pruning_ratio=r, ignored_layers=[_last_linear(mm)])
            small = tp_prune_to(copy.deepcopy(dense), x, t, mk); recalibrate_bn(small, dls.train)
            l = learner(dls, small, opt); pr = accuracy_of(l); fit(l, total, opt)
            out.append({**base, **row('tp_l1', dls, dense, l.model, x, t, opt, total, dict(pruned=pr, final=accuracy_of(l)), t0)})
        for ctx in ('local', 'global'):
            if f'fasterai_{ctx}' not in rows: continue
            try: from fasterai.prune.all import Pruner; from fasterai.core.criteria import large_final; from fasterai.distill.all import KnowledgeDistillationCallback, SoftTarget
            except ImportError: out.append({**base, 'row': f'fasterai_{ctx}', 'note': 'not run: fasterai not installed (pip install -e ".[bench]")'}); continue
            t0 = time.process_time(); set_seed(seed)
            # fasterai's structured Pruner (torch-pruning underneath, its large_final criterion), one shot at the channel ratio
            # that meets the MACs target, then fine-tuning with its KnowledgeDistillationCallback from the dense network
            mk = lambda mm, r: _FaStep(Pruner(mm, r, ctx, large_final, example_inputs=x, ignored_layers=[_last_linear(mm)]))
            small = tp_prune_to(copy.deepcopy(dense), x, t, mk); recalibrate_bn(small, dls.train)
            l = learner(dls, small, opt); pr = accuracy_of(l)
            fit(l, total, opt, [KnowledgeDistillationCallback(copy.deepcopy(dense).eval(), SoftTarget)])
            out.append({**base, **row(f'fasterai_{ctx}', dls, dense, l.model, x, t, opt, total, dict(pruned=pr, final=accuracy_of(l)), t0)})
    return out

class _FaStep:
    "fasterai's `Pruner` seen as a pruner with `step()`, for `tp_prune_to`"
    def __init__(self, p): self.p = p
    def step(self): self.p.prune_model()

def _last_linear(m): return [o for o in m.modules() if isinstance(o, torch.nn.Linear)][-1]

def table(rows):
    "Mean and spread over seeds per (net, opt, target, row)"
    keys = sorted({(r['net'], r['opt'], r['target'], r['row']) for r in rows}, key=lambda k: (k[0], k[1], -k[2], k[3]))
    cols = ['sparse', 'pruned', 'final', 'params', 'macs', 'macs_vs_target', 'latency_ms', 'cpu_s']
    lines = [f"{'net':9}{'opt':5}{'target':>7} {'row':16}" + ''.join(f'{c:>16}' for c in cols) + '  note']
    for k in keys:
        rs = [r for r in rows if (r['net'], r['opt'], r['target'], r['row']) == k]
        def fmt(c):
            v = [r[c] for r in rs if r.get(c) is not None]
            if not v: return f"{'-':>16}"
            m, s = float(np.mean(v)), float(np.max(v) - np.min(v))
            if c in ('sparse', 'pruned', 'final'): return f"{100*m:>10.2f}±{100*s:<5.2f}"
            if c in ('params', 'macs'): return f"{m:>16.4g}"
            return f"{m:>16.3f}"
        lines.append(f"{k[0]:9}{k[1]:5}{k[2]:>7.3g} {k[3]:16}" + ''.join(fmt(c) for c in cols) + '  ' + (rs[0].get('note') or ''))
    return '\n'.join(lines)

ROWS = ['tp_bnscale', 'tp_l1', 'fasterai_local', 'fasterai_global', 'fs_slimming', 'fs_l1', 'scratch_b']
def setup(threads:int):
    "MNIST-10k loaders (8,000 train / 2,000 test) and one input, with `threads` torch threads, no progress bars, the command line printed"
    if not DATA.exists(): raise SystemExit(f"no data at {DATA}")
    torch.set_num_threads(threads); warnings.simplefilter('ignore')
    from fastai.basics import defaults
    from fastai.callback.progress import ProgressCallback
    defaults.callbacks = [c for c in defaults.callbacks if c is not ProgressCallback]   # no bars in the log (scratch_b's learner too)
    dls = npz_dls(DATA, n_train=8000, bs=128)
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  python {' '.join(sys.argv)}")
    return dls, dls.one_batch()[0][:1].cpu()

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--nets', nargs='+', default=list(NETS), choices=list(NETS))
    p.add_argument('--opts', nargs='+', default=list(OPTS), choices=list(OPTS))
    p.add_argument('--targets', type=float, nargs='+', default=[0.25, 0.1, 1/30])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--rows', nargs='+', default=ROWS, choices=ROWS)
    p.add_argument('--width', type=float, default=1., help='multiplier of every layer width')
    p.add_argument('--dense', type=int, default=4, help='dense epochs')
    p.add_argument('--sparse', type=int, default=4, help='sparsity epochs (rows without that stage fine-tune them)')
    p.add_argument('--finetune', type=int, default=3)
    p.add_argument('--settle', type=float, nargs='*', default=[], help="extra fs_slimming rows with these `settle` values of its sparsity stage")
    p.add_argument('--tp_reg', type=float, default=1e-5, help="BNScalePruner's reg (its default)")
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    dls, x = setup(a.threads)
    print(f"# MNIST-10k (8000 train / 2000 test); dense {a.dense} ep, then {a.sparse}+{a.finetune} ep for every row; width x{a.width}")
    rows = []
    for net in a.nets:
        for opt in a.opts:
            for seed in a.seeds:
                new = run_one(net, opt, seed, a.targets, a, dls, x)
                rows += new
                for r in new: print('# row ' + json.dumps(r), flush=True)   # every row as it lands: a long run can be cut short
                print(f"# done {net} {opt} seed {seed}", flush=True)
    print(table(rows))

if __name__ == '__main__': main()
