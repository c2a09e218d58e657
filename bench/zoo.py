"""Model-zoo sweep: how many of the timm and torchvision models people use fastslim slims, by category.

Every torchvision classification model, and the smallest model (by parameter count, measured on the meta device)
of every timm family (family: timm module plus name prefix, e.g. `resnet:seresnext`), is built with random
weights, planned with 50% of its channels removed by L2 filter magnitude, compacted, and compared with the masked
model (see tests/zoo/sweep.py for the statuses). Models run in worker subprocesses with a timeout and a memory
cap per model (a hang or out-of-memory kills the worker, is recorded, and a fresh worker takes the next model). Results are appended to a CSV as they come, so the sweep can run in chunks and resume; the markdown
table and the summary by category are written from the CSV.

    python bench/zoo.py --only tv                  # torchvision (about 80 models)
    python bench/zoo.py --only timm --chunk 1/4    # a quarter of the timm families
    python bench/zoo.py --report                   # bench/zoo_results.md from bench/zoo_results.csv
"""
import csv, json, re, sys, threading, time
from collections import Counter, defaultdict
from pathlib import Path
from fastcore.script import call_parse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tests'/'zoo'))
from sweep import sweep, parse, SUCCESS, FAILURE

CATEGORIES = ['torchvision CNNs', 'torchvision transformers', 'timm CNNs', 'timm hybrids', 'timm transformers/MLP']
FIELDS = ['model', 'source', 'category', 'status', 'size', 'groups', 'macs_before', 'macs_after', 'params_before',
          'params_after', 'rel_diff', 'seconds', 'peak_gib', 'reason', 'skipped']
_PREFIXES = ('tf', 'gluon', 'legacy', 'ssl', 'swsl', 'ig', 'timm')

def torchvision_models():
    import torchvision
    return ['tv:' + n for n in torchvision.models.list_models(module=torchvision.models)]

def _timm_params(cache):
    "{timm model name: parameter count}, counted on the meta device (no memory, no weights) and cached"
    import timm, torch, warnings
    cache = Path(cache)
    res = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [n for n in timm.list_models() if n not in res]
    for n in todo:
        try:
            with warnings.catch_warnings(), torch.device('meta'):
                warnings.simplefilter('ignore')
                res[n] = sum(p.numel() for p in timm.create_model(n, pretrained=False).parameters())
        except Exception: res[n] = None
    if todo: cache.parent.mkdir(parents=True, exist_ok=True); cache.write_text(json.dumps(res))
    return res

def timm_family(name, module):
    "'module:prefix': the name's first token without its size digits (two tokens after 'tf_', 'legacy_', ...)"
    toks = name.split('_')
    fam = re.sub(r'\d.*$', '', toks[0]) or toks[0]
    if fam in _PREFIXES and len(toks) > 1: fam += '_' + (re.sub(r'\d.*$', '', toks[1]) or toks[1])
    return f'{module}:{fam}'

def timm_models(cache=Path.home()/'.cache'/'fastslim'/'timm_params.json'):
    "The smallest model of every timm family"
    import timm
    params = _timm_params(cache)
    fams = defaultdict(list)
    for mod in timm.list_modules():
        for n in timm.list_models(module=mod): fams[timm_family(n, mod)].append(n)
    return sorted(min(ns, key=lambda n: (params.get(n) or float('inf'), n)) for ns in fams.values())

def _read(path):
    if not Path(path).exists(): return []
    with open(path) as f: return list(csv.DictReader(f))

_lock = threading.Lock()

def _append(path, r):
    new = not Path(path).exists()
    with _lock, open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, FIELDS, extrasaction='ignore')
        if new: w.writeheader()
        w.writerow({**r, 'skipped': json.dumps(r.get('skipped', {})), 'reason': str(r.get('reason', ''))[:400]})

def _pct(a, b): return f"{a/b:.0%}" if b else '-'

def report(rows):
    "Markdown: summary by category, then one row per model"
    by = defaultdict(list)
    for r in rows: by[r.get('category') or ('torchvision CNNs' if r['source'] == 'tv' else 'n/a')].append(r)
    out = ['# Model-zoo sweep', '',
           'Random weights, 50% of channels by L2 filter magnitude, masked vs compacted outputs compared '
           '(`python bench/zoo.py`; statuses in tests/zoo/sweep.py). *Slimmed* = ok, ok-unverified or partial, '
           'with MACs reduced; models that do not run at all here (`n/a`) are not counted.', '',
           '| category | models | slimmed | ok | ok-unverified | partial | refused | failures (crash, hang, oom, non-equivalent) |',
           '|---|---|---|---|---|---|---|---|']
    for c in CATEGORIES + [c for c in by if c not in CATEGORIES]:
        rs = [r for r in by.get(c, []) if r['status'] != 'n/a']
        if not rs: continue
        n = Counter(r['status'] for r in rs)
        slim = sum(n[s] for s in SUCCESS)
        out.append(f"| {c} | {len(rs)} | {slim} ({_pct(slim, len(rs))}) | {n['ok']} | {n['ok-unverified']} | {n['partial']} "
                   f"| {n['refused']} | {sum(n[s] for s in FAILURE)} |")
    out += ['', '| model | category | status | input | groups | MACs kept | max rel. diff | s | reason / groups left unpruned |',
            '|---|---|---|---|---|---|---|---|---|']
    for r in sorted(rows, key=lambda r: (CATEGORIES.index(r['category']) if r.get('category') in CATEGORIES else 9, r['model'])):
        mb, ma = float(r.get('macs_before') or 0), float(r.get('macs_after') or 0)
        sk = json.loads(r['skipped']) if r.get('skipped') else {}
        fails = sorted({v.split(' (')[0][:90] for v in sk.values() if not v.startswith(('attention', 'grouped', 'every channel'))})
        why = (r.get('reason') or '') + (f" [{len(sk)} left: {'; '.join(fails)[:300]}]" if fails else '')
        d = r.get('rel_diff') or ''
        d = f"{float(d):.0e}" if d not in ('', 'None') else ''
        out.append(f"| {r['source']}:{r['model']} | {r.get('category') or ''} | {r['status']} | {r.get('size') or ''} "
                   f"| {r.get('groups') or ''} | {_pct(ma, mb) if mb and ma else ''} | {d} | {r.get('seconds') or ''} "
                   f"| {why.replace('|', '/')} |")
    return '\n'.join(out) + '\n'

@call_parse
def main(only:str='', # 'tv' or 'timm' (default both)
         chunk:str='1/1', # 'i/n': run the i-th of n equal slices of the model list
         models:str='', # comma-separated model specs instead ('tv:name' for torchvision)
         csv_path:str=str(ROOT/'bench'/'zoo_results.csv'), # results, appended per model
         out:str=str(ROOT/'bench'/'zoo_results.md'), # the markdown table
         rerun:bool=False, # run models already in the CSV again (their old rows are dropped)
         timeout:float=600., # seconds per model before it counts as hung
         time_limit:float=120., # the plan's own time limit (within which it must finish or refuse)
         memory_cap:float=16., # GiB per model (resident, weights included) before it counts as out of memory; the plan's own `memory_limit` (6 GiB extra) stops it first
         workers:int=1, # models run at the same time
         report_only:bool=False, # only write the markdown from the CSV
        ):
    "Sweep the model zoo and write the table"
    if not report_only:
        specs = models.split(',') if models else (torchvision_models() if only != 'timm' else []) + (timm_models() if only != 'tv' else [])
        i, n = map(int, chunk.split('/'))
        specs = specs[(i-1)*len(specs)//n: i*len(specs)//n]
        done = {(r['source'], r['model']) for r in _read(csv_path)}
        if rerun:
            keep = [r for r in _read(csv_path) if (r['source'], r['model']) not in {parse(s)[::-1] for s in specs}]
            Path(csv_path).unlink(missing_ok=True)
            for r in keep: _append(csv_path, {**r, 'skipped': json.loads(r['skipped'] or '{}')})
            done = {(r['source'], r['model']) for r in keep}
        specs = [s for s in specs if parse(s)[::-1] not in done]
        print(f"{len(specs)} models to run", flush=True)
        sweep(specs, timeout=timeout, memory_cap=memory_cap, time_limit=time_limit, workers=workers,
              done=lambda r: _append(csv_path, r), log=sys.stdout)
    Path(out).write_text(report(_read(csv_path)))
    print(Path(out).read_text().split('\n\n| model')[0])
