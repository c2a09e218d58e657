"""Width search (`fastslim.search.search_widths`) against the global criteria on MNIST-10k, fine-tuned and from scratch.

For each net (the VGG and the ResNet-20 of `bench/peers.py`, widths scaled by `--width`: x0.5 for the VGG, x1.0 for the ResNet-20) and seed: train dense
(`peers.learner`/`peers.fit`: Adam, one-cycle), then at each MACs target build three shapes of the same budget:

* `global_l1`: one global threshold over L1 filter norms (`SlimPlan.select(l1 scores, target_macs=t)`), one shot;
* `global_slimming`: the same over BatchNorm |gamma| (Network Slimming's criterion, without its sparsity stage);
* `search`: `search_widths(learn, t, n_trials, criterion='l1')`, L1 choosing the channels within each group: trials
  scale the global L1 widths per stage (`relative=True`, the default);
* `search_absolute`: the same with `relative=False`: trials propose each stage's keep fraction outright.

Each shape is compacted, its BatchNorm statistics re-estimated, then fine-tuned for the same `--finetune` epochs with
distillation from the dense network (`DistillCallback`), and trained from scratch with the dense run's compute
(Scratch-B, `fastslim.prune.scratch_b`). Prints mean over seeds of test accuracy (the last 2,000 images, never seen by
the search), MACs / target, the CPU seconds of the search and of the fine-tuning.

    python bench/search.py                                  # 2 nets x 2 targets x 2 seeds
    python bench/search.py --nets vgg --targets 0.0333 --seeds 0 --trials 10
"""
import argparse, contextlib, copy, datetime, io, json, sys, time, warnings
from pathlib import Path
import numpy as np, torch
from fastai.vision.all import accuracy, set_seed
from fastslim.core import count_macs, example_batch
from fastslim.plan import SlimPlan
from fastslim.criteria import get_criterion
from fastslim.prune import recalibrate_bn, scratch_b
from fastslim.distill import DistillCallback
from fastslim.slim import accuracy_of
from fastslim.search import search_widths
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import NETS, OPTS, DATA, learner, fit, setup   # the same nets, data, optimizers and dense training as bench/peers.py

def cpu(): return time.process_time()

def global_shape(dense, dls, t, crit, min_keep):
    "The compacted network of one global threshold of `crit`'s scores at `target_macs=t`"
    plan = SlimPlan(copy.deepcopy(dense), example_batch(dls), min_keep=min_keep)
    plan.select(get_criterion(crit).scores(plan, dls), target_macs=t, scope='global', min_keep=min_keep)
    return plan.apply().compact()

def finetune(small, dense, dls, a):
    "(accuracy with BN statistics re-estimated, accuracy after `a.finetune` epochs of KD from `dense`, CPU seconds)"
    t0 = cpu()
    small = recalibrate_bn(copy.deepcopy(small), dls.train)
    l = learner(dls, small, a.opt); pruned = accuracy_of(l)
    fit(l, a.finetune, a.opt, [DistillCallback(copy.deepcopy(dense).eval())])
    return pruned, accuracy_of(l), cpu() - t0

def scratch(small, dls, a, dense_macs, seed):
    t0 = cpu()
    f, lr, wd = OPTS[a.opt]
    with contextlib.redirect_stdout(io.StringIO()):   # fastai's per-epoch lines
        sb = scratch_b(dls, small, a.dense, dense_macs, lr=lr, seed=seed, metrics=accuracy, opt_func=f, **({} if wd is None else dict(wd=wd)))
    return accuracy_of(sb), sb.n_epoch, cpu() - t0

def dense_net(net, seed, a, dls):
    set_seed(seed)
    return fit(learner(dls, NETS[net](a.width[net]), a.opt), a.dense, a.opt).model.eval()

def shapes_at(net, seed, t, dense, dls, a):
    "{row: (compacted network, extra columns)} of the three shapes at target `t`"
    shapes = {}
    for crit in ('l1', 'slimming'):
        if f'global_{crit}' in a.rows: shapes[f'global_{crit}'] = (global_shape(dense, dls, t, crit, a.min_keep), {})
    kw = {k: v for k, v in dict(kd_steps=a.kd_steps, calib_batches=a.calib, score_batches=a.score, metric=a.metric).items() if v is not None}
    for row, relative in (('search', True), ('search_absolute', False)):
        if row not in a.rows: continue
        t0 = cpu(); set_seed(seed)
        ws = search_widths(learner(dls, copy.deepcopy(dense), a.opt), t, n_trials=a.trials, criterion=a.criterion, space=a.space,
                           relative=relative, starts=a.starts, min_keep=a.min_keep, seed=seed, show_progress=False,
                           path=Path(a.runs)/f"{net}_s{seed}_t{t:.4g}{'' if relative else '_abs'}", **kw)
        shapes[row] = (ws.plan.compact(), dict(search_cpu_s=cpu() - t0, best_trial=ws.best_trial.number,
                                               proxy_start=ws.trials[0]['value'], proxy_best=ws.best_trial.value))
    return shapes

def emit(rows, r):
    rows.append(r); print('# row ' + json.dumps(r), flush=True)

def run(a, dls, x):
    "Dense nets first, then target by target (the first first): the fine-tuned rows, then their Scratch-B; a cut-short run keeps what it printed"
    rows, dense, small = [], {}, {}
    for net in a.nets:
        for seed in a.seeds:
            dense[net, seed] = dense_net(net, seed, a, dls)
            emit(rows, dict(net=net, seed=seed, target=1., row='dense', final=accuracy_of(learner(dls, dense[net, seed], a.opt)), macs_vs_target=1.))
    for t in a.targets:
        small = {}
        for net in a.nets:
            for seed in a.seeds:
                d = dense[net, seed]; dm = count_macs(d, x)
                for name, (m, extra) in shapes_at(net, seed, t, d, dls, a).items():
                    r = dict(net=net, seed=seed, target=t, row=name, macs_vs_target=count_macs(m, x) / dm / t, **extra)
                    set_seed(seed)
                    r['pruned'], r['final'], r['finetune_cpu_s'] = finetune(m, d, dls, a)
                    emit(rows, r); small[net, seed, name] = (m, r)
        print(table(rows), flush=True)
        if t not in a.scratch_targets: continue
        for (net, seed, name), (m, r) in small.items():
            if seed not in a.scratch_seeds: continue
            r['scratch_b'], r['scratch_epochs'], r['scratch_cpu_s'] = scratch(m, dls, a, count_macs(dense[net, seed], x), seed)
            print(f"# scratch {net} seed {seed} {t:.4g} {name}: {r['scratch_b']:.4f} ({r['scratch_epochs']} ep, {r['scratch_cpu_s']:.0f} CPU-s)", flush=True)
    return rows

COLS = ['pruned', 'final', 'scratch_b', 'scratch_epochs', 'macs_vs_target', 'search_cpu_s', 'finetune_cpu_s', 'scratch_cpu_s']
def table(rows):
    "Mean over seeds per (net, target, row)"
    keys = sorted({(r['net'], r['target'], r['row']) for r in rows}, key=lambda k: (k[0], -k[1], k[2]))
    lines = [f"{'net':9}{'MACs':>6} {'row':16}" + ''.join(f'{c:>15}' for c in COLS)]
    for k in keys:
        rs = [r for r in rows if (r['net'], r['target'], r['row']) == k]
        def fmt(c):
            v = [r[c] for r in rs if r.get(c) is not None]
            if not v: return f"{'-':>15}"
            m = float(np.mean(v))
            return f"{100*m:>15.2f}" if c in ('pruned', 'final', 'scratch_b') else f"{m:>15.0f}" if c == 'scratch_epochs' else f"{m:>15.3f}" if c == 'macs_vs_target' else f"{m:>15.1f}"
        lines.append(f"{k[0]:9}{'1x' if k[1] == 1 else f'{1/k[1]:.0f}x':>6} {k[2]:16}" + ''.join(fmt(c) for c in COLS))
    return '\n'.join(lines)

def goals(rows, a):
    "The issue's goals at the last (smallest) target, per net: searched - best global, fine-tuned and Scratch-B, and the costs"
    t, res = min(a.targets), []
    for net in a.nets:
        m = lambda row, c: float(np.mean([r[c] for r in rows if (r['net'], r['target'], r['row']) == (net, t, row) and r.get(c) is not None] or [np.nan]))
        best = max(('global_l1', 'global_slimming'), key=lambda g: m(g, 'final'))
        best_sb = max(('global_l1', 'global_slimming'), key=lambda g: m(g, 'scratch_b'))
        for row in [r for r in ('search', 'search_absolute') if r in a.rows]:
            d, dsb = 100 * (m(row, 'final') - m(best, 'final')), 100 * (m(row, 'scratch_b') - m(best_sb, 'scratch_b'))
            cs, cf = m(row, 'search_cpu_s'), m(row, 'finetune_cpu_s')
            res.append(f"{net} at {1/t:.0f}x: {row} - {best} (fine-tuned) = {d:+.2f} points (goal >= +0.50: {'met' if d >= 0.5 else 'NOT met'}); "
                       f"Scratch-B {row} - {best_sb} = {dsb:+.2f} points (goal > 0: {'met' if dsb > 0 else 'NOT met'}); "
                       f"search {cs/60:.2f} CPU-min vs fine-tuning {cf/60:.2f} CPU-min (goal search <= fine-tuning: {'met' if cs <= cf else 'NOT met'})")
    return '\n'.join(res)

def scratch_only(a, dls, x):
    "Scratch-B of the searched shapes stored in `a.runs` (the best trial's widths: Scratch-B needs the architecture only)"
    import optuna
    from fastslim.plan.select import select_per_group
    from fastslim.criteria import l1_scores
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for net in a.nets:
        for seed in a.scratch_seeds:
            for t in a.scratch_targets:
                st = optuna.load_study(study_name='widths', storage=f"sqlite:///{Path(a.runs)/f'{net}_s{seed}_t{t:.4g}'/'search.db'}")
                keep, m = st.best_trial.user_attrs['keep'], NETS[net](a.width[net])
                plan = SlimPlan(m, example_batch(dls), min_keep=a.min_keep)
                select_per_group(plan, l1_scores(plan), {n: 1 - k / plan[n].size for n, k in keep.items()}, min_keep=a.min_keep)
                small = plan.compact()
                acc, ep, s = scratch(small, dls, a, count_macs(NETS[net](a.width[net]), x), seed)
                print(f"# scratch {net} seed {seed} {t:.4g} search (widths of {a.runs}): {acc:.4f} ({ep} ep, {s:.0f} CPU-s, "
                      f"MACs/target {count_macs(small, x) / count_macs(m, x) / t:.3f})", flush=True)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--nets', nargs='+', default=list(NETS), choices=list(NETS))
    p.add_argument('--targets', type=float, nargs='+', default=[1/30, 0.1])
    p.add_argument('--scratch_targets', type=float, nargs='*', default=None, help='targets with a Scratch-B row (default: all)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--scratch_seeds', type=int, nargs='*', default=None, help='seeds with a Scratch-B row (default: all)')
    p.add_argument('--width', type=float, default=None, help='multiplier of every layer width (peers.NETS); default x0.5 for vgg, '
                   'x1.0 for resnet20 (at x0.5 its floor, two channels per group, keeps more than 1/30 of the MACs)')
    p.add_argument('--opt', default='adam', choices=list(OPTS))
    p.add_argument('--dense', type=int, default=2, help='dense epochs (and the compute Scratch-B matches)')
    p.add_argument('--finetune', type=int, default=3, help='distillation fine-tuning epochs of every shape')
    p.add_argument('--rows', nargs='+', default=['global_l1', 'global_slimming', 'search', 'search_absolute'])
    p.add_argument('--criterion', default='l1', help="the search's criterion: trial 0's global widths and the channels within each group")
    p.add_argument('--starts', nargs='*', default=['slimming'], help="more criteria whose global widths are early trials")
    p.add_argument('--trials', type=int, default=20)
    p.add_argument('--space', default='stage', choices=['stage', 'group'])
    p.add_argument('--kd_steps', type=int, default=None, help="default: search_widths's")
    p.add_argument('--calib', type=int, default=None, help="default: search_widths's")
    p.add_argument('--score', type=int, default=None, help="default: search_widths's")
    p.add_argument('--metric', default=None, choices=['loss', 'accuracy'], help="default: search_widths's")
    p.add_argument('--min_keep', type=float, default=0.1)
    p.add_argument('--runs', default='/tmp/fastslim_search_bench', help='folder of the studies (resumable)')
    p.add_argument('--scratch_only', action='store_true', help="only Scratch-B of the searched widths already stored in --runs")
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    a.width = {n: a.width or (1. if n == 'resnet20' else 0.5) for n in NETS}
    a.scratch_targets = a.targets if a.scratch_targets is None else a.scratch_targets
    a.scratch_seeds = a.seeds if a.scratch_seeds is None else a.scratch_seeds
    dls, x = setup(a.threads)
    print(f"# MNIST-10k (8000 train / 2000 test); {a.opt}, dense {a.dense} ep; every shape: BN re-estimated, then {a.finetune} ep of KD "
          f"from dense, and Scratch-B; search: {a.trials} trials, space {a.space}, criterion {a.criterion}, starts {a.starts}, "
          f"KD steps / calib+score batches / metric {a.kd_steps}/{a.calib}+{a.score}/{a.metric} (None: search_widths's default); "
          f"widths {a.width}; Scratch-B at targets {a.scratch_targets}, seeds {a.scratch_seeds}")
    t0 = time.time()
    if a.scratch_only: return scratch_only(a, dls, x)
    rows = run(a, dls, x)
    print(table(rows))
    print(goals(rows, a))
    print(f"# total {time.time() - t0:.0f}s wall")

if __name__ == '__main__': main()
