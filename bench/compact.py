"""Compaction benchmark: how fast fastslim plans and compacts a network, and whether the MACs it removes turn into CPU speed.

(a) Time to build a `SlimPlan` on torchvision's ResNet-50 (random init, input 1x3x224x224), select 50% of channels
    by L2 norm and compact, median of `n` repeats, next to torch-pruning's own `DependencyGraph.build_dependency`
    on the same model and input. Goal: plan + select + compact under 1 s on 2 cores.
(b) CPU latency (batch 32, one thread, median) of compacted against dense, next to the MACs ratio, for VGG-16-BN
    CIFAR at 32x32 and ResNet-50 at 64x64, with 50% and 75% of channels removed by L2 norm, scope 'local' (every
    layer shrinks by the same share) and 'global'. Goal: speed-up / MACs reduction >= 0.8.

    python bench/compact.py              # about 3-5 minutes on 2 cores
    python bench/compact.py --n 5 --size 96
"""
import copy, statistics, time, warnings
import torch, torchvision
import torch_pruning as tp
from fastcore.script import call_parse
from fastslim.core import count_macs, cpu_latency
from fastslim.plan import SlimPlan

def _timed(f):
    t0 = time.perf_counter(); r = f(); return r, time.perf_counter() - t0

def plan_times(make, x, ratio=0.5, verify='auto'):
    "Seconds for torch-pruning's graph, our plan, select and compact on a fresh `make()` model"
    _, t_tp = _timed(lambda: tp.DependencyGraph().build_dependency(make(), x))
    model = make()
    plan, t_plan = _timed(lambda: SlimPlan(model, x, verify=verify))
    _, t_sel = _timed(lambda: plan.select(plan.l2_scores(), ratio=ratio))
    _, t_comp = _timed(plan.compact)
    return dict(tp=t_tp, plan=t_plan, select=t_sel, compact=t_comp, total=t_plan + t_sel + t_comp)

def speed_rows(name, model, x, ratios, n):
    "(setting, MACs dense/slim, latency dense/slim, efficiency) for each scope and ratio"
    dense_macs, dense_lat = count_macs(model, x[:1]), cpu_latency(model, x, n=n, threads=1)
    plan = SlimPlan(model, x[:1], verify=False)   # select re-sets the masks each time; verify is tested in the notebooks
    scores = plan.l2_scores()
    rows = []
    for scope in ('local', 'global'):
        for r in ratios:
            plan.select(scores, ratio=r, scope=scope)
            small = plan.compact()
            mr = dense_macs / count_macs(small, x[:1])
            sr = dense_lat / cpu_latency(small, x, n=n, threads=1)
            widths = [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
            rows.append((f'{name} {scope} {r:.0%}', mr, sr, sr / mr, min(widths), dense_lat))
    return rows

def _vgg16():
    import timm, fastslim.models  # registers fastslim_* with timm
    return timm.create_model('fastslim_vgg16_bn_cifar', num_classes=10)

@call_parse
def main(
    n:int=3, # repeats (median reported) for timing the plan, and timed forwards per latency
    lat_n:int=5, # timed forwards per latency measurement
    size:int=64, # ResNet-50 input side for the latency test (64 or 96 keeps it tractable on one thread)
    verify:str='auto', # SlimPlan's `verify` for part (a): 'auto' (the default: select checks outputs) or 'False'
    skip_a:bool=False, # skip part (a)
    threads:int=2, # CPU threads for part (a) (use 1 on a machine shared with other jobs: OpenMP oversubscribes)
):
    warnings.filterwarnings('ignore')
    torch.manual_seed(0); torch.set_num_threads(threads)
    print(f"torch threads for part (a): {torch.get_num_threads()}")
    if not skip_a:
        v = False if verify == 'False' else verify
        make = lambda: torchvision.models.resnet50()
        x = torch.randn(1, 3, 224, 224)
        runs = [plan_times(make, x, verify=v) for _ in range(n)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"\n(a) ResNet-50, 1x3x224x224, 50% channels by L2 (verify={verify!r}), median of {n} (seconds)")
        print(f"{'torch-pruning build_dependency':34} {med['tp']:8.2f}")
        for k in ('plan', 'select', 'compact', 'total'): print(f"{'fastslim ' + k:34} {med[k]:8.2f}")
        print(f"plan+select+compact / tp build: {med['total']/med['tp']:.1f}x   goal: total < 1 s -> {'met' if med['total'] < 1 else 'NOT met'}")

    print(f"\n(b) CPU latency, batch 32, 1 thread, median of {lat_n}; random init; channels ranked by L2 norm")
    rows = speed_rows('VGG-16-BN 32px', _vgg16(), torch.randn(32, 3, 32, 32), (0.5, 0.75), lat_n)
    rows += speed_rows(f'ResNet-50 {size}px', torchvision.models.resnet50(), torch.randn(32, 3, size, size), (0.5, 0.75), lat_n)
    print(f"{'setting (share removed)':28} {'MACs dense/slim':>16} {'speed-up':>9} {'speed/MACs':>11} {'min width':>10} {'dense ms':>9}")
    for s, mr, sr, e, w, dl in rows: print(f"{s:28} {mr:15.2f}x {sr:8.2f}x {e:11.2f} {w:10d} {dl*1e3:9.1f}")
    loc = [r[3] for r in rows if 'local' in r[0]]
    print(f"goal speed-up / MACs reduction >= 0.8 (local): {'met' if min(loc) >= 0.8 else 'NOT met'} (min {min(loc):.2f})")
