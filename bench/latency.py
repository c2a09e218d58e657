"""Latency benchmark (issue #19): does `round_to` turn a MACs reduction into measured speed, how does fastslim's pruned
network compare with Torch-Pruning's at the same MACs, and are latency budgets (`target_latency`) met end to end?

Models (random weights, the same for every variant of a model: latency does not depend on them): torchvision ResNet-50 and MobileNetV2 at `--size`
(96x96 by default, to fit the run on 2 cores) and the fastslim CIFAR zoo's ResNet-56 at 32x32.
For MACs targets 0.5 and 0.25 of the dense network:
  - fastslim: L1 filter norms normalised per group (`fastslim.criteria.L1Norm`), one global selection to the MACs
    target (`SlimPlan.select(target_macs=...)`), `min_keep=0.1` (what `learn.slim` uses), with and without `round_to=8`;
  - Torch-Pruning: `MetaPruner` global pruning with its L1 `MagnitudeImportance` (normalised per group, the same
    ranking), `max_pruning_ratio=0.9`, with and without its `round_to=8`; its `pruning_ratio` is bisected until the
    MACs land on the same target (Torch-Pruning has no MACs target of its own).
Measured: MACs ratio (fastslim's counter for both), the share of conv/linear output widths that are multiples of 8,
and latency / dense latency in onnxruntime (CPU, 1 thread, via `fastslim.export.export_onnx` + `onnx_latency`) at
batch 1 and 8, and in PyTorch eager (`fastslim.core.cpu_latency`, 1 thread) at batch 1 and 8. Timings are
interleaved: every round times every variant of a model once (the dense one included, order rotating), and the
median over rounds of each round's pruned / dense ratio is reported (the goal line adds the rounds' 25-75% range), so
a machine shared with other jobs slows all variants alike; `--stat min` reports the fastest run of each variant over
the dense model's fastest run instead (other jobs only ever add time), and the goal line gives the other statistic too. `--warm` untimed runs before each timing re-warm the caches
the other variants took; `--clock cpu` times the thread's CPU time instead of the wall clock.

Latency targets (`--part latency`, or `all`): for budgets 0.5 and 0.25 of the dense latency in onnxruntime (CPU, 1 thread,
batch 1), `fastslim.latency.LatencyModel` measures its per-group tables (a fresh cache folder: the cost reported is a real
measurement), `SlimPlan.select(target_latency=..., round_to=r)` (r from `--lat-round-to`, 8 by default; several values give
one row each) selects and checks itself end to end, and then this script
times the result independently: exported by `export_onnx` (the deployment exporter), interleaved rounds with the dense
model as above, medians. A budget is met when that measured ratio is at most 1.05 x the budget.

Speed ceiling (`--part ceiling`, written to latency_ceiling.txt next to `--out`): can any ResNet-56 with every width a multiple of 8
reach the goal's speed-up / MACs reduction of 0.9 at half the MACs? Every shape with uniform widths per stage (3 residual streams,
3 inner widths, multiples of 8) whose MACs lie within 0.49-0.505 of the dense ones is timed in onnxruntime (1 thread, batch 1 and 8)
against the dense model run by run, the fastest retimed, next to both libraries' selections, the narrowest shape (every width 8: the
fastest a latency budget can get at round_to=8) and one conv timed at every output width (onnxruntime's channel blocks show as steps).
`--round-to 8,16` adds rows rounded to 16 to the MACs part (onnxruntime's NCHWc block on AVX-512 CPUs).

    python bench/latency.py                      # MACs targets, about 10-15 minutes on 2 cores
    python bench/latency.py --part ceiling       # the ResNet-56 ceiling, about 4 minutes
    python bench/latency.py --rounds 5 --models resnet56   # a quick look
    python bench/latency.py --part latency --models resnet56,mobilenet_v2   # latency targets (the section is rewritten in --out)
"""
import copy, datetime, itertools, math, statistics, sys, tempfile, time, warnings
from pathlib import Path
import torch, torchvision, timm
import torch_pruning as tp
from fastcore.script import call_parse
import fastslim.models   # registers the CIFAR zoo with timm
from fastslim.core import count_macs, cpu_latency
from fastslim.criteria import L1Norm
from fastslim.export import export_onnx, onnx_latency, ort_session
from fastslim.latency import LatencyModel
from fastslim.plan import SlimPlan

MODELS = {'resnet50': (lambda: torchvision.models.resnet50(), 'imagenet'),
          'mobilenet_v2': (lambda: torchvision.models.mobilenet_v2(), 'imagenet'),
          'resnet56': (lambda: timm.create_model('fastslim_resnet56_cifar'), 'cifar')}
TIMINGS = ('ort bs1', 'ort bs8', 'torch bs1', 'torch bs8')

def out_layer(model):
    "The classifier: the last Linear, left alone by both libraries"
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]

def widths_mult(model, k=8):
    "Share of the conv/linear output widths (the classifier left out) that are multiples of `k`"
    last = out_layer(model)
    w = [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features for m in model.modules()
         if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m is not last]
    return sum(v % k == 0 for v in w) / len(w)

def fastslim_prune(make, x, target, round_to):
    model = make().eval()
    plan = SlimPlan(model, x, min_keep=0.1, verify=False)   # compaction equivalence is tested in the notebooks
    plan.select(L1Norm().scores(plan), target_macs=target, round_to=round_to)
    return plan.compact().eval()

def tp_prune(make, x, ratio, round_to):
    model = make().eval()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
                                  pruning_ratio=ratio, max_pruning_ratio=0.9, ignored_layers=[out_layer(model)], round_to=round_to)
    pruner.step()
    return model.eval()

def tp_at_macs(make, x, target, round_to, dense_macs, tol=0.005, iters=12):
    "Torch-Pruning's model whose MACs are nearest `target` of the dense ones, its `pruning_ratio` bisected"
    lo, hi, best = 0., 0.9, None
    for _ in range(iters):
        r = (lo + hi) / 2
        m = tp_prune(make, x, r, round_to)
        f = count_macs(m, x) / dense_macs
        if best is None or abs(f - target) < abs(best[1] - target): best = (m, f, r)
        if abs(f - target) <= tol: break
        lo, hi = (r, hi) if f > target else (lo, r)
    return best

CLOCKS = {'wall': time.perf_counter, 'cpu': time.thread_time}   # one thread runs on the calling thread: its CPU time is the run's compute

def timers(model, x1, x8, tmp, name, clock='wall', runs=3, warm=0):
    "One timing function per measurement: each call runs the variant `warm` times untimed (its caches warm again after the others ran), then times `runs` runs on `clock` and returns their seconds"
    p, c = Path(tmp)/f'{name}.onnx', CLOCKS[clock]
    export_onnx(model, p, x8[:2])
    sess = ort_session(p, threads=1)
    for x in (x1, x8): onnx_latency(sess, x, n=1, warmup=2); cpu_latency(model, x, n=1, warmup=2)
    def each(f, x): return [f(x, n=1, warmup=warm if i == 0 else 0, clock=c) for i in range(runs)]
    return {'ort bs1': lambda: each(lambda x, **k: onnx_latency(sess, x, **k), x1), 'ort bs8': lambda: each(lambda x, **k: onnx_latency(sess, x, **k), x8),
            'torch bs1': lambda: each(lambda x, **k: cpu_latency(model, x, **k), x1), 'torch bs8': lambda: each(lambda x, **k: cpu_latency(model, x, **k), x8)}

STATS = ('median', 'min')

def ratios(times, base, stat):
    """Pruned / dense latency of one timing: 'median', the median over rounds of each round's ratio (each round: the median of its runs);
    'min', the fastest run of the variant over the fastest run of the dense model (interference from other jobs only ever adds time)"""
    if stat == 'min': return min(map(min, times)) / min(map(min, base)), quartiles([min(a) / min(b) for a, b in zip(times, base)])
    r = [statistics.median(a) / statistics.median(b) for a, b in zip(times, base)]
    return statistics.median(r), quartiles(r)

def bench_model(name, rounds, size, log, clock='wall', runs=3, warm=0, stat='median', round_tos=(8,)):
    make, kind = MODELS[name]
    side = 32 if kind == 'cifar' else size
    torch.manual_seed(0)
    x1, x8 = torch.randn(1, 3, side, side), torch.randn(8, 3, side, side)
    dense = make().eval()
    make = lambda: copy.deepcopy(dense)   # every variant prunes the same dense weights
    dense_macs = count_macs(dense, x1)
    variants = {('dense', None, None): dense}
    for target in (0.5, 0.25):
        for r in (None, *round_tos):
            t0 = time.perf_counter()
            variants[('fastslim', target, r)] = fastslim_prune(make, x1, target, r)
            m, f, ratio = tp_at_macs(make, x1, target, r, dense_macs)
            variants[('torch-pruning', target, r)] = m
            log(f"  {name}: pruned at MACs {target} round_to={r} in {time.perf_counter() - t0:.0f} s (torch-pruning ratio {ratio:.3f} -> MACs {f:.3f})")
    with tempfile.TemporaryDirectory() as tmp:
        fns = {k: timers(m, x1, x8, tmp, f'v{i}', clock, runs, warm) for i, (k, m) in enumerate(variants.items())}
        times = {k: {t: [] for t in TIMINGS} for k in variants}
        keys = list(variants)
        t0 = time.perf_counter()
        for i in range(rounds):
            order = keys[i % len(keys):] + keys[:i % len(keys)]   # the order rotates: no variant always runs first
            for t in TIMINGS:
                for k in order: times[k][t].append(fns[k][t]())
        log(f"  {name}: {rounds} interleaved rounds in {time.perf_counter() - t0:.0f} s")
    base = times[('dense', None, None)]   # per round, the same minutes for every variant
    rows = []
    for k, m in variants.items():
        macs = count_macs(m, x1) / dense_macs
        rel = {s: {t: ratios(times[k][t], base[t], s) for t in TIMINGS} for s in STATS}
        rows.append(dict(model=f'{name} {side}px', method=k[0], target=k[1], round_to=k[2], macs=macs, mult8=widths_mult(m),
                         **{t: rel[stat][t][0] for t in TIMINGS}, spread={t: rel[stat][t][1] for t in TIMINGS},
                         other={s: {t: v[0] for t, v in d.items()} for s, d in rel.items() if s != stat},
                         dense_ms={t: 1e3 * (min(map(min, base[t])) if stat == 'min' else statistics.median(map(statistics.median, base[t]))) for t in TIMINGS}))
    return rows

def quartiles(v):
    "The 25% and 75% points of `v`"
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], q[2]

def table(rows):
    head = (f"{'model':18} {'method':14} {'MACs tgt':>8} {'round_to':>8} {'MACs':>6} {'x8 widths':>9} "
            + ' '.join(f'{t:>9}' for t in TIMINGS) + f" {'ort-bs8 speed-up/MACs red.':>27}")
    lines = [head, '-' * len(head)]
    for r in rows:
        eff = (1 / r['ort bs8']) / (1 / r['macs']) if r['method'] != 'dense' else 1.
        lines.append(f"{r['model']:18} {r['method']:14} {r['target'] or '-':>8} {r['round_to'] or '-':>8} {r['macs']:6.3f} {r['mult8']:9.0%} "
                     + ' '.join(f"{r[t]:9.3f}" for t in TIMINGS) + f" {eff:27.2f}")
    return lines

def verdicts(rows):
    "The issue's 'done when' checks that this benchmark can answer"
    out = []
    for model in dict.fromkeys(r['model'] for r in rows):
        rs = {(r['method'], r['target'], r['round_to']): r for r in rows if r['model'] == model}
        for rt in [k[2] for k in rs if k[:2] == ('fastslim', 0.5) and k[2]]:
            fs = rs[('fastslim', 0.5, rt)]
            eff = fs['macs'] / fs['ort bs8']
            lo, hi = (fs['macs'] / q for q in reversed(fs['spread']['ort bs8']))
            alt = ', '.join(f"{s}: {fs['macs'] / d['ort bs8']:.2f}" for s, d in fs['other'].items())
            goal = f"goal >= 0.9: {'met' if eff >= 0.9 else 'NOT met'}" if rt == 8 else 'the goal is stated for round_to=8'
            out.append(f"{model}: round_to={rt} at MACs 0.5, onnxruntime bs8 speed-up / MACs reduction = {eff:.2f} "
                       f"(rounds' 25-75%: {lo:.2f}-{hi:.2f}; {goal}; the same timings by {alt})")
        for target in (0.5, 0.25):
            for r in [k[2] for k in rs if k[:2] == ('fastslim', target)]:
                a, b = rs[('fastslim', target, r)], rs[('torch-pruning', target, r)]
                out.append(f"  MACs {target} round_to={r}: fastslim / torch-pruning latency, ort bs1 {a['ort bs1']/b['ort bs1']:.2f}, "
                           f"ort bs8 {a['ort bs8']/b['ort bs8']:.2f}, torch bs8 {a['torch bs8']/b['torch bs8']:.2f} "
                           f"(MACs {a['macs']:.3f} vs {b['macs']:.3f}; < 1: fastslim faster)")
    return out

LAT_TARGETS, LAT_MARK = (0.5, 0.25), '== latency targets (target_latency) =='

def latency_targets(name, rounds, size, log, cache_dir, tol=0.05, stat='median', n=10, round_to=8):
    "Rows of `target_latency` budgets on onnxruntime CPU, 1 thread, batch 1, widths rounded to `round_to`: the selection's own rounds and an independent end-to-end timing"
    make, kind = MODELS[name]
    side = 32 if kind == 'cifar' else size
    torch.manual_seed(0)
    x1 = torch.randn(1, 3, side, side)
    dense = make().eval()
    plan = SlimPlan(copy.deepcopy(dense), x1, min_keep=0.1, verify=False)
    scores = L1Norm().scores(plan)
    lat = LatencyModel(plan, runtime='onnxruntime', bs=1, threads=1, round_to=round_to, tol=tol, cache_dir=cache_dir, stat=stat, n=n)
    log(f"  {name}: {lat}")
    variants, info = {'dense': dense}, {}
    for t in LAT_TARGETS:
        t0 = time.perf_counter()
        plan.select(scores, target_latency=t, latency=lat, round_to=round_to)
        variants[t] = plan.compact().eval()
        widths = {g.name: g.n_keep for g in plan.groups}
        info[t] = dict(rounds=plan.latency_rounds, kept=next((o for o in reversed(plan.latency_rounds) if o['widths'] == widths), plan.latency_rounds[-1]), seconds=time.perf_counter() - t0, macs=count_macs(variants[t], x1) / count_macs(dense, x1))
        log(f"  {name}: target_latency={t} in {info[t]['seconds']:.0f} s, rounds (predicted goal, predicted, measured): "
            + ', '.join(f"({o['predicted_goal']:.3f}, {o['predicted']:.3f}, {o['measured']:.3f})" for o in plan.latency_rounds))
    with tempfile.TemporaryDirectory() as tmp:
        sess = {}
        for k, m in variants.items():
            p = Path(tmp)/f'{k}.onnx'
            export_onnx(m, p, torch.randn(2, 3, side, side))
            sess[k] = ort_session(p, threads=1); onnx_latency(sess[k], x1, n=1, warmup=3)
        times, fast, keys = {k: [] for k in variants}, {k: [] for k in variants}, list(variants)
        for i in range(rounds):
            for k in keys[i % len(keys):] + keys[:i % len(keys)]:
                ts = [onnx_latency(sess[k], x1, n=1, warmup=0) for _ in range(3 if stat == 'median' else n)]
                times[k].append(statistics.median(ts)); fast[k].append(min(ts))
    med = {k: statistics.median(v) if stat == 'median' else min(fast[k]) for k, v in times.items()}
    rows = []
    for t in LAT_TARGETS:
        r, last, kept = med[t] / med['dense'], info[t]['rounds'], info[t]['kept']
        rows.append(dict(model=f'{name} {side}px', round_to=round_to, target=t, measured=r, macs=info[t]['macs'], rounds=len(last), kept_round=kept['round'],
                         predicted=kept['predicted'], self_check=kept['measured'], self_measured=[round(o['measured'], 3) for o in last], select_s=info[t]['seconds'], dense_ms=1e3 * med['dense'],
                         cost=lat.cost, met=r <= t * (1 + tol), within=abs(r / t - 1) <= tol))
    return rows

def latency_lines(rows, rounds, wall, stat='median', n=10):
    head = (f"{'model':18} {'round_to':>8} {'target':>6} {'measured':>8} {'met':>4} {'+-5%':>4} {'MACs':>6} {'predicted':>9} {'self-check':>10} {'kept':>4} "
            f"{'rounds':>6}  selection's own checks (measured / dense, each round)")
    lines = [LAT_MARK, f"python {' '.join(sys.argv)}", f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
             f"onnxruntime CPU, 1 thread, batch 1, round_to {sorted({r['round_to'] for r in rows})}, min_keep=0.1, L1 scores, random weights; {rounds} interleaved rounds; timings: "
             + ("3 runs each, medians" if stat == 'median' else f"the fastest of {n} runs each (stat='min'), the fastest round"),
             '', 'measured: pruned / dense latency timed here, after the selection, on `export_onnx` files (met: <= 1.05 x target; +-5%: within 5% either way);',
             "predicted / self-check: the latency model's prediction and the selection's own end-to-end check of the kept round (kept: its index)", '',
             head, '-' * len(head)]
    for r in rows:
        lines.append(f"{r['model']:18} {r['round_to']:8} {r['target']:6} {r['measured']:8.3f} {'yes' if r['met'] else 'NO':>4} {'yes' if r['within'] else 'no':>4} "
                     f"{r['macs']:6.3f} {r['predicted']:9.3f} {r['self_check']:10.3f} {r['kept_round']:4} {r['rounds']:6}  {r['self_measured']}")
    lines.append('')
    for model, rt in dict.fromkeys((r['model'], r['round_to']) for r in rows):
        same = [o for o in rows if (o['model'], o['round_to']) == (model, rt)]
        r, c = same[0], same[0]['cost']
        lines.append(f"{model} round_to={rt}: dense {r['dense_ms']:.2f} ms; latency tables: {c['timings']} timings (of {n} runs each) in {c['seconds']:.0f} s"
                     f"{' (read from the cache)' if c.get('cached') else ''}; selections with their checks: "
                     + ', '.join(f"{o['target']}: {o['select_s']:.0f} s" for o in same))
    met = sum(r['met'] for r in rows)
    lines += ['', f"latency budgets met within 5% (measured <= 1.05 x target): {met} of {len(rows)}", f'wall time {wall:.0f} s']
    return lines

CEIL_STAGES = ((16, 32, 32), (32, 16, 16), (64, 8, 8))   # ResNet-56: (width, output side, input side of its first block) per stage

def resnet56_macs(s, i):
    "MACs of the CIFAR ResNet-56 with stage widths `s` (its residual streams) and uniform inner widths `i` of each stage's blocks"
    m, c = 9 * 3 * s[0] * 32 * 32, s[0]
    for k, (_, hw, _) in enumerate(CEIL_STAGES):
        a = hw * hw
        m += 9 * a * (c * i[k] + i[k] * s[k]) + (a * c * s[k] if k else 0) + 8 * 9 * a * 2 * s[k] * i[k]   # first block (its 1x1 shortcut), then 8 more
        c = s[k]
    return m + c * 10

def resnet56_shape(dense, x, s, i):
    "A compacted copy of `dense` (fastslim's CIFAR ResNet-56) with stage widths `s` and inner widths `i` (each group keeps its first channels)"
    plan = SlimPlan(copy.deepcopy(dense), x, min_keep=0.01, verify=False)
    stream = {'features.stem.conv': s[0], 'features.stage2.0.shortcut.conv': s[1], 'features.stage3.0.shortcut.conv': s[2]}
    for g in plan.groups:
        w = stream.get(g.name) or i[int(g.name.split('.')[1][-1]) - 1]
        g.keep.fill_(True); g.keep[w:] = False
    return plan.compact().eval()

def quick_onnx(m, p, x):
    "`m` to ONNX by the TorchScript exporter, about 20x faster than `export_onnx`'s dynamo one; after onnxruntime's graph optimisations both give the same fused Conv nodes on these models"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(m, (x,), str(p), dynamo=False, input_names=['x'], dynamic_axes={'x': {0: 'batch'}})

def conv_steps(tmp, n=15, cin=64, side=8, bs=8):
    "onnxruntime (1 thread) microseconds of one 3x3 conv from `cin` channels at `side`x`side`, batch `bs`, for output widths 8, 16, ..., `cin`: the runtime's channel block shows as steps"
    x, out = torch.randn(bs, cin, side, side), {}
    for w in range(8, cin + 1, 8):
        m = torch.nn.Sequential(torch.nn.Conv2d(cin, w, 3, padding=1), torch.nn.ReLU()).eval()
        p = Path(tmp)/f'conv{w}.onnx'; quick_onnx(m, p, x[:2])
        s = ort_session(p, threads=1); onnx_latency(s, x, n=1, warmup=3)
        out[w] = 1e6 * min(onnx_latency(s, x, n=1, warmup=0) for _ in range(n))
    return out

def ceiling(log, n=15, out='', lo=0.49, hi=0.505, step=8, top=3):
    """How fast can ResNet-56 be at half its MACs with every width a multiple of `step`? Every shape with uniform widths per stage
    (3 residual streams, 3 inner widths) whose MACs lie in [lo, hi] of the dense ones, timed in onnxruntime (1 thread, bs 1 and 8,
    `export_onnx` files) against the dense model run by run; the fastest `top` timed again with 3x the runs, next to fastslim's
    and Torch-Pruning's own selections at MACs 0.5 and the narrowest shape (every width `step`, the floor of a latency budget)"""
    t0 = time.perf_counter()
    make, _ = MODELS['resnet56']
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    X = {1: x, 8: torch.randn(8, 3, 32, 32)}
    dense = make().eval()
    D = count_macs(dense, x)
    assert resnet56_macs((16, 32, 64), (16, 32, 64)) == D, 'the MACs formula no longer matches the zoo ResNet-56'
    ws = [range(step, w + 1, step) for w, _, _ in CEIL_STAGES]
    shapes = [(s, i) for s in itertools.product(*ws) for i in itertools.product(*ws) if lo <= resnet56_macs(s, i) / D <= hi]
    log(f"  ceiling: {len(shapes)} shapes with MACs in [{lo}, {hi}] of the dense {D / 1e6:.1f} M")
    with tempfile.TemporaryDirectory() as tmp:
        def session(m, name):
            p = Path(tmp)/f'{name}.onnx'; quick_onnx(m, p, X[8][:2])
            s = ort_session(p, threads=1)
            for v in X.values(): onnx_latency(s, v, n=1, warmup=3)
            return s
        ds = session(dense, 'dense')
        def ratio(s, bs, k):
            "fastest of `k` runs of `s` over the fastest of `k` runs of the dense model, alternating run by run"
            a, b = [], []
            for _ in range(k): a.append(onnx_latency(ds, X[bs], n=1, warmup=0)); b.append(onnx_latency(s, X[bs], n=1, warmup=0))
            return min(b) / min(a)
        def row(name, m, k, shape=None):
            macs = count_macs(m, x) / D; s = session(m, 'v')
            r1, r8 = ratio(s, 1, k), ratio(s, 8, k)
            return dict(name=name, shape=shape, macs=macs, bs1=r1, bs8=r8, eff1=macs / r1, eff8=macs / r8)
        rows = []
        for j, (s, i) in enumerate(shapes):
            if j % 20 == 0: log(f"  ceiling: shape {j} of {len(shapes)}, {time.perf_counter() - t0:.0f} s")
            m = resnet56_shape(dense, x, s, i)
            assert count_macs(m, x) == resnet56_macs(s, i)
            rows.append(row(f'streams {s} inner {i}', m, n, (s, i)))
        rows.sort(key=lambda r: -r['eff8'])
        picked = rows[:top] + [r for r in [max(rows, key=lambda r: r['eff1'])] if r not in rows[:top]]
        again = [row(r['name'], resnet56_shape(dense, x, *r['shape']), 3 * n, r['shape']) for r in picked]
        plans = [row('fastslim L1, global, target_macs=0.5, round_to=8', fastslim_prune(lambda: copy.deepcopy(dense), x, 0.5, step), 3 * n),
                 row('torch-pruning L1, global, same MACs, round_to=8', tp_at_macs(lambda: copy.deepcopy(dense), x, 0.5, step, D)[0], 3 * n),
                 row(f'narrowest: every width {step}', resnet56_shape(dense, x, (step,) * 3, (step,) * 3), 3 * n)]
        steps = conv_steps(tmp, 3 * n)
    fmt = lambda r: f"{r['name']:52} {r['macs']:6.3f} {r['bs1']:8.3f} {r['eff1']:9.2f} {r['bs8']:8.3f} {r['eff8']:9.2f}"
    head = f"{'shape':52} {'MACs':>6} {'ort bs1':>8} {'speed/MAC':>9} {'ort bs8':>8} {'speed/MAC':>9}"
    b8, b1 = max(again, key=lambda r: r['eff8']), max(again, key=lambda r: r['eff1'])
    lines = ['== ResNet-56 speed ceiling at half the MACs ==', f"python {' '.join(sys.argv)}",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, onnxruntime CPU, 1 thread, random weights, "
             f"TorchScript-exported ONNX files (`quick_onnx`); each timing: the fastest of {n} runs (retimed: {3 * n}) over the dense model's fastest, run by run", '',
             'latency columns: pruned / dense; speed/MAC: speed-up / MACs reduction (MACs / latency ratio); the goal of #19 is >= 0.9', '',
             f'the fastest {top} of {len(shapes)} shapes by bs8 speed/MAC (and the fastest by bs1):', head, '-' * len(head)] + [fmt(r) for r in rows[:top]]
    lines += ['', 'those retimed, then the selections of the two libraries and the narrowest shape:', head, '-' * len(head)] + [fmt(r) for r in again + plans]
    lines += ['', f"one 3x3 conv, 64 input channels at 8x8, batch 8 (+ReLU), fastest of {3 * n} runs, microseconds by output width: "
              + ', '.join(f'{w}: {t:.0f}' for w, t in steps.items())]
    lines += ['', f"ceiling, among the {len(shapes)} shapes retimed: speed-up / MACs reduction {b8['eff8']:.2f} at bs8 ({b8['name']}), "
              f"{b1['eff1']:.2f} at bs1 ({b1['name']}); goal 0.9 {'reachable' if max(b8['eff8'], b1['eff1']) >= 0.9 else 'NOT reached by any of them'}",
              f"wall time {time.perf_counter() - t0:.0f} s"]
    print('\n'.join(lines))
    if out: Path(out).parent.mkdir(parents=True, exist_ok=True); Path(out).write_text('\n'.join(lines) + '\n')

@call_parse
def main(
    models:str='resnet50,mobilenet_v2,resnet56', # comma-separated names from MODELS
    size:int=96, # input side of the ImageNet models (ResNet-56 runs at 32)
    rounds:int=15, # interleaved timing rounds (`runs` runs each; the median over rounds is reported)
    out:str='bench/results/latency.txt', # where the table goes ('' for nowhere)
    runs:int=3, # MACs part: timed runs per variant and round (their median is the round's value)
    warm:int=0, # MACs part: untimed runs before them, each round (the other variants ran in between and took the caches)
    clock:str='wall', # MACs part: 'wall' (perf_counter) or 'cpu' (the thread's CPU time: other processes do not inflate it)
    part:str='macs', # 'macs' (MACs targets vs Torch-Pruning), 'latency' (target_latency budgets) or 'all'
    cache:str='', # latency-table cache folder ('' for a fresh temporary one, so the measurement cost is real)
    stat:str='median', # what a timing reports: 'median' (MACs part: the median over rounds of each round's ratio) or 'min' (the fastest run: steadier on a shared machine)
    n:int=10, # latency targets: runs per timing
    lat_round_to:str='8', # latency targets: comma-separated `round_to` values, one row per budget each (1: no rounding)
    round_to:str='8', # MACs part: comma-separated `round_to` values, each a pair of rows next to the unrounded ones
):
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)
    if clock not in CLOCKS: raise ValueError(f"`clock` must be one of {list(CLOCKS)}, got {clock!r}")
    if part not in ('macs', 'latency', 'all', 'ceiling'): raise ValueError(f"`part` must be 'macs', 'latency', 'all' or 'ceiling', got {part!r}")
    if part == 'ceiling': return ceiling(log, n=n, out=str(Path(out).with_name('latency_ceiling.txt')) if out else '')
    if stat not in STATS: raise ValueError(f"`stat` must be one of {list(STATS)}, got {stat!r}")
    if part in ('latency', 'all'):
        with tempfile.TemporaryDirectory() as tmp:
            lrows = [r for name in models.split(',') for rt in map(int, lat_round_to.split(','))
                     for r in latency_targets(name, rounds, size, log, cache or tmp, stat=stat, n=n, round_to=rt)]
        section = latency_lines(lrows, rounds, time.perf_counter() - t0, stat, n)
        print('\n'.join(section))
        if out:
            old = Path(out).read_text() if Path(out).exists() else ''
            old = old.split(LAT_MARK)[0].rstrip('\n')
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text((old + '\n\n' if old else '') + '\n'.join(section) + '\n')
        if part == 'latency': return
        t0 = time.perf_counter()
    rows = []
    for name in models.split(','): rows += bench_model(name, rounds, size, log, clock, runs, warm, stat, tuple(map(int, round_to.split(','))))
    how = ('the fastest run of each variant over the dense model\'s fastest run' if stat == 'min' else 'the median of the per-round ratios')
    lines = [f"python {' '.join(sys.argv)}", f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
             f"torch-pruning {tp.__version__}, 1 thread, random weights, {rounds} interleaved rounds x {runs} runs after {warm} warm-up, {clock} clock, stat {stat}", '',
             f'latency columns: pruned / dense latency, {how} (lower is faster); MACs: pruned / dense; x8 widths: share of conv/linear widths that are multiples of 8',
             ''] + table(rows) + [''] + verdicts(rows) + ['', f'wall time {time.perf_counter() - t0:.0f} s']
    dense = [r for r in rows if r['method'] == 'dense']
    lines += [f"dense latency, {r['model']}: " + ', '.join(f"{t} {v:.2f} ms" for t, v in r['dense_ms'].items()) for r in dense]
    print('\n'.join(lines))
    if out:
        old = Path(out).read_text() if Path(out).exists() else ''
        keep = LAT_MARK + old.split(LAT_MARK, 1)[1] if LAT_MARK in old else ''   # the latency-target section stays
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text('\n'.join(lines) + '\n' + ('\n' + keep if keep else ''))
