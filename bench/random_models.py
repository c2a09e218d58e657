"""Random small CNNs, pruned as `PruneCallback`/`learn.slim` prune them, compacted and checked against the masked model.

Each model is a random sequence of blocks: convolutions (plain, grouped, depthwise), residual adds, `torch.cat` of
branches (and of the input with a branch), `torch.split` with fixed sizes, `chunk(2)`, channel shuffle and max-pool,
then a head (global pool -> Linear, flatten -> Linear, or concat -> flatten -> Linear), with BatchNorm holding random
running statistics. Each is planned (in eval or training mode), pruned with the self-check on (the default of
`select`, `PruneCallback` and `learn.slim`) by normalised L1 (the 'l1' criterion) or random scores, at a random
ratio, `min_keep=0.1` (as `learn.slim`), then:

- the compacted model must run and equal the masked one within 1e-4 of the largest output, on inputs other than
  the planning example, in eval and training mode;
- no group is emptied (every group keeps >= 1 channel);
- `save_slim`/`load_slim` round trips (compacted and masked) are bit-exact.

A group that the check cannot make equivalent is left unpruned with a reason in `plan.skipped`: the counts of those
reasons are printed. `tests/test_random_models.py` runs the same generator under hypothesis at CI size.

    python bench/random_models.py              # 1,000 models, about 10 minutes on one core
    python bench/random_models.py --n 200 --seed 1
"""
import collections, copy, math, random, re, sys, tempfile, time, traceback, warnings
from pathlib import Path
import torch
from torch import nn
from fastcore.script import call_parse
from fastslim.plan import SlimPlan, save_slim, load_slim, PlanError
from fastslim.criteria import get_criterion

__all__ = ['draw_spec', 'RandomCNN', 'check_model', 'Result']

# ------------------------------------------------------------------------------------------------- the generator
def draw_spec(choice, max_blocks:int=5):
    "A random model spec; `choice(options)` picks one of a list (`random.Random.choice`, or a hypothesis draw)"
    c, h = choice([4, 6, 8, 12]), 8
    c0 = c
    blocks, n = [], choice(list(range(1, max_blocks + 1)))
    for _ in range(n):
        kinds = ['conv', 'res', 'cat', 'cat_input', 'shuffle', 'split', 'chunk'] + (['pool'] if h >= 4 else [])
        k = choice(kinds)
        if k == 'conv':
            g = choice(['1', 'dw', 'g2'] if c % 2 == 0 else ['1', 'dw'])
            co = c if g == 'dw' else choice([c, 2 * c] if g == 'g2' else [4, 6, 8, 12, 16])
            blocks.append(('conv', co, choice([1, 3]), g, choice([True, False]))); c = co
        elif k == 'res': blocks.append(('res', choice(['1', 'dw'])))
        elif k == 'cat':
            a, b = choice([2, 4, 6]), choice([2, 4, 6]); blocks.append(('cat', a, b)); c = a + b
        elif k == 'cat_input':
            a = choice([2, 4, 8]); blocks.append(('cat_input', a)); c += a
        elif k == 'shuffle':
            gs = [g for g in (2, 3, 4) if c % g == 0]
            if gs: blocks.append(('shuffle', choice(gs)))
        elif k == 'split':
            if c >= 2:
                s = choice(list(range(1, c))); blocks.append(('split', c, s, choice(['cat', 'conv_cat'])))
        elif k == 'chunk':
            if c % 2 == 0 and c >= 4:
                how = choice(['add', 'cat', 'gate']); blocks.append(('chunk', how)); c = c if how == 'cat' else c // 2
        elif k == 'pool': blocks.append(('pool',)); h //= 2
    head = choice(['gap', 'flat', 'cat_flat'])
    aux = choice([None, None] + list(range(len(blocks))))   # an auxiliary head that runs only in training mode
    return dict(c0=c0, blocks=blocks, head=head, h=h, aux=aux)

def _cbr(ci, co, k=3, groups=1, relu=True):
    return nn.Sequential(nn.Conv2d(ci, co, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(co),
                         *([nn.ReLU()] if relu else []))

class RandomCNN(nn.Module):
    "The model of a spec from `draw_spec`: a stem conv, the blocks, a head of 5 logits"
    def __init__(self, spec, seed:int=0, in_chans:int=3, n_out:int=5):
        super().__init__()
        torch.manual_seed(seed)
        self.spec, mods = spec, nn.ModuleList()
        c = spec['c0']
        self.stem = _cbr(in_chans, c)
        for b in spec['blocks']:
            k = b[0]
            if k == 'conv':
                _, co, ks, g, relu = b
                groups = c if g == 'dw' else 2 if g == 'g2' else 1
                mods.append(_cbr(c, co, ks, groups, relu)); c = co
            elif k == 'res':
                mods.append(nn.Sequential(_cbr(c, c, 3, c if b[1] == 'dw' else 1), _cbr(c, c, 1, relu=False)))
            elif k == 'cat': mods.append(nn.ModuleList([_cbr(c, b[1], 1), _cbr(c, b[2], 3)])); c = b[1] + b[2]
            elif k == 'cat_input': mods.append(_cbr(c, b[1], 3)); c += b[1]
            elif k == 'split':
                _, cs, s, how = b
                if cs != c: raise ValueError('spec out of sync')
                mods.append(_cbr(s, s, 3) if how == 'conv_cat' else nn.Identity())
            elif k == 'chunk': mods.append(_cbr(c // 2, c // 2, 3)); c = c if b[1] == 'cat' else c // 2
            else: mods.append(nn.Identity())
            if spec.get('aux') == len(mods) - 1: self.aux = nn.Sequential(_cbr(c, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n_out))
        self.blocks, h = mods, spec['h']
        head = spec['head']
        if head == 'gap': self.head = nn.Linear(c, n_out)
        elif head == 'flat': self.head = nn.Linear(c * h * h, n_out)
        else: self.side, self.head = _cbr(c, 4, 1), nn.Linear((c + 4) * h * h, n_out)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):   # random statistics: an equivalence check on them is not vacuous
                    m.running_mean.uniform_(-.5, .5); m.running_var.uniform_(.5, 2.)
                    m.weight.uniform_(.2, 1.2); m.bias.uniform_(-.3, .3)

    def forward(self, x):
        x, aux = self.stem(x), None
        for i, (b, m) in enumerate(zip(self.spec['blocks'], self.blocks)):
            k = b[0]
            if k in ('conv',): x = m(x)
            elif k == 'res': x = torch.relu(x + m(x))
            elif k == 'cat': x = torch.cat([m[0](x), m[1](x)], 1)
            elif k == 'cat_input': x = torch.cat([x, m(x)], 1)
            elif k == 'shuffle':
                n, c, h, w = x.shape; g = b[1]
                x = x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)
            elif k == 'split':
                a, r = torch.split(x, [b[2], b[1] - b[2]], dim=1)   # sizes fixed when the model was built
                x = torch.cat([r, m(a)], 1)
            elif k == 'chunk':
                a, r = x.chunk(2, 1)
                x = a + m(r) if b[1] == 'add' else torch.cat([m(a), r], 1) if b[1] == 'cat' else a * torch.sigmoid(m(r))
            elif k == 'pool': x = nn.functional.max_pool2d(x, 2)
            if self.training and self.spec.get('aux') == i: aux = self.aux(x)
        if self.spec['head'] == 'gap': x = x.mean((2, 3))
        elif self.spec['head'] == 'cat_flat': x = torch.cat([x, self.side(x)], 1).flatten(1)
        else: x = x.flatten(1)
        y = self.head(x)
        return (y, aux) if aux is not None else y

# ------------------------------------------------------------------------------------------------- the check
class Result:
    "What happened to one model: `status` ('ok', 'crash', 'non-equivalent', 'empty group', 'round trip', 'refused') and details"
    def __init__(self, status, detail='', skipped=None, diff=0., removed=0.):
        self.status, self.detail, self.skipped, self.diff, self.removed = status, detail, skipped or {}, diff, removed
    def __repr__(self): return f"Result({self.status!r}, {self.detail[:200]!r}, skipped={list(self.skipped)}, diff={self.diff:.1e})"

def _run(model, x, train):
    "Output tensors of `model` on `x` in eval or training mode, on a copy (training mode updates BatchNorm statistics)"
    m = copy.deepcopy(model).train(train)
    with torch.no_grad(): y = m(x)
    return [t.float() for t in (y if isinstance(y, tuple) else (y,))]

def _rel(a, b):
    return max(((x - y).abs().max() / max(x.abs().max().item(), y.abs().max().item(), 1e-12)).item() for x, y in zip(a, b))

def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)

def check_model(spec, seed:int=0, ratio:float=0.5, scores:str='l1', scope:str='global', plan_train:bool=False,
                tol:float=1e-4, tmp=None):
    "Plan, prune (`select` with its default self-check, `min_keep`=0.1), compact and check one `RandomCNN`"
    model = RandomCNN(spec, seed).train(plan_train)
    g = torch.Generator().manual_seed(seed)
    ex = torch.randn(2, 3, 8, 8, generator=g) * 2 + 0.5
    try: plan = SlimPlan(model, ex)
    except (PlanError, ValueError) as e: return Result('refused', f"{type(e).__name__}: {e}")
    if not plan.groups: return Result('ok', 'no prunable group', plan.skipped)
    if scores == 'l1': s = get_criterion('l1').scores(plan)
    else: s = {gr.name: torch.rand(gr.size, generator=g) for gr in plan.groups}
    try:
        plan.select(s, ratio=ratio, scope=scope, min_keep=0.1)
        plan.apply()
        small = plan.compact()
    except Exception as e: return Result('crash', f"selecting or compacting: {type(e).__name__}: {e}", plan.skipped)
    empty = [gr.name for gr in plan.groups if gr.n_keep < 1]
    if empty: return Result('empty group', f"groups {empty} keep no channel", plan.skipped)
    xs = [torch.randn(3, 3, 8, 8, generator=g) * 2 + 0.5 for _ in range(2)]   # not the planning example, nor the check's
    worst = 0.
    for train in (False, True):
        for x in xs:
            a = _run(model, x, train)
            try: b = _run(small, x, train)
            except Exception as e:
                return Result('crash', f"the compacted model fails in {'training' if train else 'eval'} mode: {type(e).__name__}: {e}", plan.skipped)
            if [t.shape for t in a] != [t.shape for t in b]:
                return Result('crash', f"output shapes {[tuple(t.shape) for t in b]} instead of {[tuple(t.shape) for t in a]}", plan.skipped)
            d = _rel(a, b); worst = max(worst, d)
            if not d <= tol:
                return Result('non-equivalent', f"{'training' if train else 'eval'} mode: differs by {d:.2e} of the largest output", plan.skipped, d)
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        try:
            save_slim(small, Path(d)/'c.pt'); back = load_slim(Path(d)/'c.pt', lambda: RandomCNN(spec, seed + 1))
            if not _state_equal(small, back): return Result('round trip', 'compacted: state differs after load_slim', plan.skipped)
            save_slim(model, Path(d)/'m.pt'); back = load_slim(Path(d)/'m.pt', lambda: RandomCNN(spec, seed + 1).train(plan_train))
            if not _state_equal(model, back): return Result('round trip', 'masked: state differs after load_slim', plan.skipped)
        except Exception as e: return Result('round trip', f"{type(e).__name__}: {e}", plan.skipped)
    removed = sum(gr.size - gr.n_keep for gr in plan.groups) / max(sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 1)
    return Result('ok', '', plan.skipped, worst, removed)

def draw_case(choice):
    "(spec, keyword arguments of `check_model`) drawn with `choice`"
    spec = draw_spec(choice)
    kw = dict(ratio=choice([0.2, 0.4, 0.5, 0.7, 0.9]), scores=choice(['l1', 'random']), scope=choice(['global', 'local']),
              plan_train=choice([False, True]), seed=choice(list(range(1000))))
    return spec, kw

def _reason(r):
    "A reason with its numbers and names stripped, to count alike reasons together"
    r = re.sub(r"`[^`]*`", '`.`', str(r))
    r = re.sub(r"\(by [^)]*\)", '', re.sub(r"\d+(\.\d+)?(e-?\d+)?", 'N', r))
    return r[:110]

@call_parse
def main(
    n:int=1000, # models to generate
    seed:int=0, # seed of the generator
    show:int=5, # failures to print in full
):
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    rng = random.Random(seed)
    counts, reasons, fails, t0 = collections.Counter(), collections.Counter(), [], time.time()
    removed, worst = [], 0.
    for i in range(n):
        spec, kw = draw_case(rng.choice)
        try: r = check_model(spec, **kw)
        except Exception as e: r = Result('crash', f"check_model raised {type(e).__name__}: {e}\n{traceback.format_exc()[-600:]}")
        counts[r.status] += 1
        if r.status == 'ok': removed.append(r.removed); worst = max(worst, r.diff)
        for k, v in r.skipped.items(): reasons[_reason(v)] += 1
        if r.status != 'ok': fails.append((spec, kw, r))
    dt = time.time() - t0
    print(f"$ python bench/random_models.py --n {n} --seed {seed}    ({dt:.0f} s, one thread)")
    print(f"models: {n}")
    for s in ('ok', 'crash', 'non-equivalent', 'empty group', 'round trip', 'refused'): print(f"  {s:16} {counts[s]}")
    print(f"models with channels removed: {sum(v > 0 for v in removed)}; conv channels removed per model: mean {sum(removed)/max(len(removed),1):.0%}; "
          f"largest masked-vs-compacted difference on fresh inputs: {worst:.1e} of the largest output")
    print(f"groups left unpruned, by reason ({sum(reasons.values())} in all):")
    for r, k in reasons.most_common(): print(f"  {k:5}  {r}")
    for spec, kw, r in fails[:show]: print('\nFAIL', r, '\n  spec', spec, '\n  kwargs', kw)
    bad = sum(counts[s] for s in ('crash', 'non-equivalent', 'empty group', 'round trip'))
    print(f"\ngoal: 0 crashes / non-equivalent / empty groups / round-trip mismatches -> {'met' if not bad else 'NOT met'}")
