"""Model-zoo sweep: slim timm and torchvision models with fastslim's plan and record what happened to each.

Each model runs in its own subprocess with a wall-clock timeout and a memory cap, so a hang or an out-of-memory
is recorded, not fatal. Every model is built with random weights (never downloaded), planned with 50% of the
channels removed by L2 filter magnitude, compacted, and its compacted outputs compared with the masked model's.

Statuses: `ok` (compacted; equal outputs where the model is normalised by BatchNorm only), `ok-unverified`
(LayerNorm/GroupNorm models: compacted, runs, MACs reduced), `partial` (some groups were left unpruned after a
failure; named in `skipped`), `refused` (one clear error: nothing could be pruned, or the graph could not be
built), `not-equivalent`, `crashed`, `hung` and `oom` (the failures), `n/a` (the model itself does not run here).

    python tests/zoo/sweep.py resnet18 tv:shufflenet_v2_x0_5 vit_tiny_patch16_224   # tv: marks torchvision
"""
from __future__ import annotations
import json, os, queue, subprocess, sys, tempfile, threading, time, traceback

SUCCESS = {'ok', 'ok-unverified', 'partial'}
FAILURE = {'not-equivalent', 'crashed', 'hung', 'oom'}
BY_DESIGN = ('attention', 'grouped convolution', 'every channel is tied', 'feeds the model output')

def _cross_channel_norm(model):
    "True where a normalisation layer mixes channels (LayerNorm, GroupNorm, ...): masked != compacted there"
    from torch import nn
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or 'BatchNorm' in type(m).__name__: continue
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)): return True
        if 'Norm' in type(m).__name__ and any(True for _ in m.parameters(recurse=False)): return True
    return False

def _kind(model, source):
    "'cnn', 'hybrid' or 'transformer' (attention or token-MLP models without spatial convolutions past the stem)"
    from torch import nn
    from fastslim.plan import attention_layers
    attn = bool(attention_layers(model))
    spatial = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and max(m.kernel_size) > 1]
    mlp = type(model).__name__ in ('MlpMixer', 'Sequencer2d') or 'Mixer' in type(model).__name__
    if mlp or (attn and len(spatial) <= 1): return 'transformer'
    return 'hybrid' if attn else 'cnn'

def category(source, kind):
    if source == 'tv': return 'torchvision CNNs' if kind == 'cnn' else 'torchvision transformers'
    return {'cnn': 'timm CNNs', 'hybrid': 'timm hybrids', 'transformer': 'timm transformers/MLP'}[kind]

SIZES = (64, 96, 128, 160, 192, 224, 256, 299)

def _runs(model, x):
    import torch
    with torch.no_grad():
        was = model.training; model.eval()
        try: model(x)
        finally: model.train(was)

def build(name, source, max_size=None):
    "(model, example input, size): the model with random weights on the smallest input it accepts from `SIZES`"
    import torch, timm, torchvision
    torch.manual_seed(0)
    if source == 'tv':
        fn = lambda **kw: torchvision.models.get_model(name, weights=None, **kw)
        default = 299 if 'inception' in name else 224
        fixed = name.startswith(('vit_', 'maxvit', 'swin'))
    else:
        fn = lambda **kw: timm.create_model(name, pretrained=False, **kw)
    model = fn()
    if source != 'tv':
        cfg = model.pretrained_cfg
        default = cfg.get('input_size', (3, 224, 224))[-1]
        fixed = False
    c = (getattr(model, 'pretrained_cfg', {}) or {}).get('input_size', (3,))[0]
    sizes = [s for s in SIZES if s < default] + [default]
    if max_size: sizes = [s for s in sizes if s <= max_size] or sizes[:1]
    last = None
    for rebuild in ((False, True) if source != 'tv' or fixed else (False,)):
        for s in sizes:
            try:
                m = model
                if rebuild:
                    torch.manual_seed(0)
                    m = fn(image_size=s) if source == 'tv' else fn(img_size=s)
                x = torch.randn(2, c, s, s)
                _runs(m, x)
                return m, x, s
            except Exception as e: last = e
    raise RuntimeError(f'{type(last).__name__}: {last}')

def _randomize_bn(model):
    "Non-trivial BatchNorm statistics, so that equal outputs are not an accident of identity normalisation"
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - .5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + .5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + .2)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * .6 - .3)

def _rel_diff(a, b, xs):
    import torch
    from fastslim.core import eval_mode
    worst = 0.
    for x in xs:
        with torch.no_grad(), eval_mode(a), eval_mode(b): ya, yb = a(x), b(x)
        ya = ya if isinstance(ya, torch.Tensor) else ya[0]; yb = yb if isinstance(yb, torch.Tensor) else yb[0]
        if ya.shape != yb.shape: return float('inf')
        worst = max(worst, ((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12)).item())
    return worst

def run_one(name, source='timm', ratio=0.5, time_limit=60., memory_limit=6., rtol=1e-4, max_size=None):
    "Plan, select, compact and compare one model; returns a dict with its status (runs in this process)"
    import torch
    torch.set_num_threads(1)
    import warnings; warnings.simplefilter('ignore')
    from fastslim.core import count_macs, count_params
    from fastslim.plan import SlimPlan, PlanError
    t0 = time.time()
    res = dict(model=name, source=source, status='crashed', reason='', size=None, groups=0, skipped={})
    try: model, x, size = build(name, source, max_size)
    except Exception as e: return {**res, 'status': 'n/a', 'reason': f'model does not run: {e}'[:300]}
    _randomize_bn(model)
    kind, cross = _kind(model, source), _cross_channel_norm(model)
    res.update(size=size, kind=kind, category=category(source, kind), cross_norm=cross, params_before=count_params(model))
    stage = 'count MACs'
    try:
        res['macs_before'] = count_macs(model, x[:1])
        stage = 'plan'
        plan = SlimPlan(model, x, time_limit=time_limit, memory_limit=memory_limit)
        stage = 'select'
        plan.select(plan.l2_scores(), ratio=ratio)
        stage = 'apply'
        plan.apply()
        stage = 'compact'
        small = plan.compact()
        res.update(groups=len(plan.groups), skipped=dict(plan.skipped), params_after=count_params(small),
                   macs_after=count_macs(small, x[:1]))
        stage = 'compare'
        diff = _rel_diff(model, small, [x, torch.randn_like(x)])
        res['rel_diff'] = diff
        failed = {k: v for k, v in plan.skipped.items() if not str(v).startswith(BY_DESIGN)}
        if res['macs_after'] >= res['macs_before']:
            res.update(status='refused', reason='nothing could be pruned: ' + '; '.join(sorted(set(plan.skipped.values())))[:300])
        elif not cross and not diff <= rtol: res.update(status='not-equivalent', reason=f'max relative difference {diff:.2e}')
        elif failed: res.update(status='partial', reason=f'{len(failed)} groups left unpruned')
        else: res.update(status='ok-unverified' if cross else 'ok')
    except PlanError as e: res.update(status='refused', reason=f'{type(e).__name__}: {e}'[:400])
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        res.update(status='crashed', reason=f'{stage}: {type(e).__name__}: {e}'[:300] + f' [{os.path.basename(tb.filename)}:{tb.lineno}]')
    res['seconds'] = round(time.time() - t0, 1)
    return res

def _rss_gib(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            for l in f:
                if l.startswith('VmRSS:'): return int(l.split()[1]) / 2**20
    except OSError: pass
    return 0.

def _env():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this tree's fastslim
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore',
            'PYTHONPATH': os.pathsep.join([root] + [p for p in [os.environ.get('PYTHONPATH')] if p])}

class Worker:
    "A subprocess that imports torch, timm and fastslim once and runs `run_one` for model after model"
    def __init__(self, recycle_gib=4.): self.p, self.recycle_gib = None, recycle_gib

    def _start(self):
        self.err = tempfile.TemporaryFile('w+')
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--worker'], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, env=_env())
        self.q = queue.Queue()
        threading.Thread(target=lambda p, q: [q.put(l) for l in p.stdout] + [q.put(None)], args=(self.p, self.q), daemon=True).start()
        if self.q.get() is None: raise RuntimeError(f'the sweep worker did not start: {self._err()}')   # 'ready' after imports

    def _err(self):
        self.err.seek(0)
        return self.err.read().strip()[-300:]

    def stop(self):
        if self.p is not None and self.p.poll() is None: self.p.kill(); self.p.wait()
        self.p = None

    def run(self, name, source='timm', timeout=300., memory_cap=10., **kw):
        "`run_one` in the worker: a hang past `timeout` seconds or memory past `memory_cap` GiB kills it and is recorded"
        if self.p is None or self.p.poll() is not None: self._start()
        self.p.stdin.write(json.dumps(dict(name=name, source=source, **kw)) + '\n'); self.p.stdin.flush()
        t0, peak, status = time.time(), 0., None
        while True:
            try: line = self.q.get(timeout=0.2)
            except queue.Empty: line = ''
            base = dict(model=name, source=source, seconds=round(time.time() - t0, 1), peak_gib=round(peak, 2))
            if line is None:
                code = self.p.wait(); err = self._err(); self.p = None
                return {**base, 'status': 'crashed', 'reason': f'the worker died (exit {code}): {err}'}
            if line.startswith('{'):
                if peak > self.recycle_gib: self.stop()      # a fresh process for the next model, with its memory back
                return {**json.loads(line), 'peak_gib': round(peak, 2)}
            peak = max(peak, _rss_gib(self.p.pid))
            if time.time() - t0 > timeout: status = 'hung'
            elif peak > memory_cap: status = 'oom'
            if status:
                self.stop()
                return {**base, 'status': status, 'reason': f"killed after {base['seconds']}s at {peak:.1f} GiB"}

def run_isolated(name, source='timm', timeout=300., memory_cap=10., **kw):
    "`run_one` in a fresh subprocess: a hang past `timeout` seconds or memory past `memory_cap` GiB is recorded"
    w = Worker()
    try: return w.run(name, source, timeout=timeout, memory_cap=memory_cap, **kw)
    finally: w.stop()

def parse(spec):
    "'tv:resnet18' -> ('resnet18', 'tv'); 'resnet18' -> ('resnet18', 'timm')"
    return (spec[3:], 'tv') if spec.startswith('tv:') else (spec, 'timm')

def sweep(models, ratio=0.5, time_limit=60., timeout=300., memory_cap=10., max_size=None, workers=1, log=None, done=None):
    "Run every model spec ('tv:name' for torchvision, else timm) in `workers` worker processes; returns the results"
    from concurrent.futures import ThreadPoolExecutor
    local, pool = threading.local(), []
    def one(spec):
        if not hasattr(local, 'w'): local.w = Worker(); pool.append(local.w)
        n, s = parse(spec)
        r = local.w.run(n, s, timeout=timeout, memory_cap=memory_cap, ratio=ratio, time_limit=time_limit, max_size=max_size)
        if done: done(r)
        if log: print(f"{s}:{n:40} {r['status']:14} {r.get('seconds', 0):6.1f}s {r.get('reason', '')[:150]}", file=log, flush=True)
        return r
    try:
        with ThreadPoolExecutor(workers) as ex: return list(ex.map(one, models))
    finally:
        for w in pool: w.stop()

def _serve():
    "Worker loop: one JSON line of `run_one` arguments in, one JSON line of results out"
    import torch, timm, torchvision, fastslim.plan
    print('ready', flush=True)
    for line in sys.stdin:
        print(json.dumps(run_one(**json.loads(line))), flush=True)

if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--one':
        print(json.dumps(run_one(**json.loads(sys.argv[2]))))
    elif sys.argv[1:] == ['--worker']: _serve()
    else:
        for r in sweep(sys.argv[1:], log=sys.stdout): pass
