"""Compaction benchmark: how fast fastslim plans and compacts a network, and whether the MACs it removes turn into CPU speed.

(a) Time to build a `SlimPlan` on torchvision's ResNet-50 (random init, input 1x3x224x224), select 50% of channels
    by L2 norm and compact, median of `n` repeats, next to torch-pruning's own `DependencyGraph.build_dependency`
    on the same model and input; once without the plan's self-check (`verify=False`, what torch-pruning does) and
    once with it (the default: `select` compacts a copy and compares its outputs with the masked model's on the
    example and two random batches at the example's scale, in eval and in training mode).
    Goal: plan + select + compact under 1 s on 2 cores.
(b) CPU latency (batch 32, one thread, median) of compacted against dense, next to the MACs ratio, for VGG-16-BN
    CIFAR at 32x32 and ResNet-50 at 224x224, with 50% and 75% of channels removed by L2 norm, scope 'local' (every
    layer shrinks by the same share) and 'global' (the L2 scores normalised per layer, as fastslim's criteria do,
    and 10% of every layer kept, as `Learner.slim` does). Measured in PyTorch eager as trained, with BatchNorm
    folded into the convolutions (`torch.fx`) in NCHW and channels-last layouts, and exported to ONNX
    (`fastslim.export`) and run by onnxruntime, the deployment runtime. Goal: speed-up / MACs reduction >= 0.8.

    python bench/compact.py              # about 5-8 minutes on 2 free cores
    python bench/compact.py --n 5 --size 224
"""
import copy, statistics, tempfile, time, warnings
from pathlib import Path
import torch, torchvision
from torch.fx.experimental.optimization import fuse
import torch_pruning as tp
from fastcore.script import call_parse
from fastslim.core import count_macs, cpu_latency
from fastslim.plan import SlimPlan
from fastslim.criteria import SoftFilter

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

LAYOUTS = ('eager', 'folded', 'folded-cl', 'onnxruntime')

def deploy_form(model, layout):
    "`model` as it runs: 'eager' (as trained), 'folded' (BatchNorm folded into convs), 'folded-cl' (and channels-last)"
    m = copy.deepcopy(model).eval()
    if layout == 'eager': return m
    m = fuse(m)
    return m.to(memory_format=torch.channels_last) if layout == 'folded-cl' else m

def ort_latency(model, x, n):
    "Median seconds of the model exported to ONNX (`fastslim.export`), run by onnxruntime with one thread"
    from fastslim.export import export_onnx, onnx_latency
    with tempfile.TemporaryDirectory() as d:
        export_onnx(model, Path(d)/'m.onnx', x[:2])
        return onnx_latency(Path(d)/'m.onnx', x, n=n, warmup=1, threads=1)

def latencies(model, x, n):
    "{layout: median seconds} at batch `x`, one thread"
    xs = {'eager': x, 'folded': x, 'folded-cl': x.contiguous(memory_format=torch.channels_last)}
    res = {l: cpu_latency(deploy_form(model, l), xs[l], n=n, warmup=1, threads=1) for l in LAYOUTS[:3]}
    return {**res, 'onnxruntime': ort_latency(model, x, n)}

def speed_rows(name, model, x, ratios, n):
    "(setting, MACs dense/slim, {layout: speed-up}, min width, dense ms) for each scope and ratio"
    dense_macs, dense_lat = count_macs(model, x[:1]), latencies(model, x, n)
    plan = SlimPlan(model, x[:1], verify=False)   # select re-sets the masks each time; verify is tested in the notebooks
    scores = SoftFilter().scores(plan)   # L2 norm of each filter, divided by its layer's mean (comparable across layers)
    rows = []
    for scope in ('local', 'global'):
        for r in ratios:
            plan.select(scores, ratio=r, scope=scope, min_keep=0.1)
            small = plan.compact()
            mr = dense_macs / count_macs(small, x[:1])
            lat = latencies(small, x, n)
            widths = [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
            rows.append((f'{name} {scope} {r:.0%}', mr, {l: dense_lat[l] / lat[l] for l in LAYOUTS}, min(widths), dense_lat['folded-cl']))
    return rows

def _vgg16():
    import timm, fastslim.models  # registers fastslim_* with timm
    return timm.create_model('fastslim_vgg16_bn_cifar', num_classes=10)

@call_parse
def main(
    n:int=5, # repeats (median reported) for timing the plan
    lat_n:int=5, # timed forwards per latency measurement
    size:int=224, # ResNet-50 input side for the latency test (the ImageNet size; 128 is faster)
    skip_a:bool=False, # skip part (a)
    skip_b:bool=False, # skip part (b)
    threads:int=2, # CPU threads for part (a) (use 1 on a machine shared with other jobs: OpenMP oversubscribes)
):
    warnings.filterwarnings('ignore')
    torch.manual_seed(0); torch.set_num_threads(threads)
    print(f"torch threads for part (a): {torch.get_num_threads()}")
    if not skip_a:
        make = lambda: torchvision.models.resnet50()
        x = torch.randn(1, 3, 224, 224)
        print(f"\n(a) ResNet-50, 1x3x224x224, 50% channels by L2, median of {n} (seconds)")
        print(f"{'':34} {'verify=False':>13} {'verify (default)':>17}")
        med = {}
        for v in (False, 'auto'):
            runs = [plan_times(make, x, verify=v) for _ in range(n)]
            med[v] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{'torch-pruning build_dependency':34} {med[False]['tp']:13.2f} {med['auto']['tp']:17.2f}")
        for k in ('plan', 'select', 'compact', 'total'): print(f"{'fastslim ' + k:34} {med[False][k]:13.2f} {med['auto'][k]:17.2f}")
        cost = med['auto']['total'] - med[False]['total']
        print(f"the self-check costs {cost:.2f} s here ({cost / med[False]['total']:.0%} of plan+select+compact without it)")
        for v, what in ((False, 'without'), ('auto', 'with')):
            t = med[v]['total']
            print(f"{what} the self-check: plan+select+compact = {t/med[v]['tp']:.1f}x tp build; goal total < 1 s -> {'met' if t < 1 else 'NOT met'}")

    if skip_b: return
    print(f"\n(b) CPU latency, batch 32, 1 thread, median of {lat_n}; random init; channels ranked by L2 norm")
    print("    speed-up = dense latency / slim latency in the same form; folded = BatchNorm folded into the convs; cl = channels-last")
    rows = speed_rows('VGG-16-BN 32px', _vgg16(), torch.randn(32, 3, 32, 32), (0.5, 0.75), lat_n)
    rows += speed_rows(f'ResNet-50 {size}px', torchvision.models.resnet50(), torch.randn(32, 3, size, size), (0.5, 0.75), lat_n)
    print(f"{'setting (share removed)':26} {'MACs dense/slim':>15} " + ' '.join(f"{'speed ' + l:>16}" for l in LAYOUTS)
          + f" {'min width':>9} {'dense ms (folded-cl)':>20}")
    for s, mr, sp, w, dl in rows:
        print(f"{s:26} {mr:14.2f}x " + ' '.join(f"{sp[l]:6.2f}x ({sp[l]/mr:4.2f})" for l in LAYOUTS) + f" {w:9d} {dl*1e3:20.1f}")
    print("(in brackets: speed-up / MACs reduction)")
    for l in LAYOUTS:
        loc = [r[2][l] / r[1] for r in rows if 'local' in r[0]]
        print(f"goal speed-up / MACs reduction >= 0.8 for every 'local' setting, {l:9}: {'met' if min(loc) >= 0.8 else 'NOT met'} (min {min(loc):.2f})")
