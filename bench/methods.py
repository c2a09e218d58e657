"""Pruning criteria compared on MNIST-10k: nine methods at the same MACs target and the same epoch budget.

Trains one dense CIFAR ResNet-20 (1 input channel, 28x28) on x[:8000], then slims a copy of it with each criterion
('l1', 'thinet', 'regression', 'slimming', 'sfp', 'taylor', 'fpgm' to `target_macs` of the dense MACs; 'magnitude'
removes the same share of weights as 'l1' did, unstructured, so its MACs do not change; 'sss' removes residual
blocks, so it gets its own `sss_ratio` and its own MACs), and trains the l1 architecture from scratch
(Scratch-E: the dense epochs; Scratch-B: the dense compute). Every method gets `budget` epochs after the dense
training (methods with a sparsity stage spend one of them on it). Printed per row, measured in this run:
accuracy right after pruning (BatchNorm statistics re-estimated, no training), after fine-tuning, params, MACs
(as a fraction of dense, against the target), the narrowest conv layer, and CPU latency at batch 32 (one thread).

    python bench/methods.py                      # --quick (default): width 8, about 10 minutes on 2 free cores
    python bench/methods.py --no-quick           # width 16 (the paper's ResNet-20), dense 6 epochs, budget 4
"""
import contextlib, copy, io, time, warnings
from pathlib import Path
import torch, timm
from torch import nn
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.metrics import accuracy
import fastslim.models  # registers fastslim_* with timm
import fastslim.slim    # Learner.slim
from fastslim.core import count_macs, count_params, cpu_latency
from fastslim.data import npz_dls
from fastslim.prune import scratch_e, scratch_b
from fastslim.slim import accuracy_of

ROOT = Path(__file__).resolve().parents[1]
CHANNEL_METHODS = ('l1', 'thinet', 'regression', 'slimming', 'sfp', 'taylor', 'fpgm')

def min_conv_width(model):
    return min(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))

def learner(dls, model):
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy)

def latency(model, x): return cpu_latency(model, x[:1].expand(32, *x.shape[1:]).contiguous(), n=5, threads=1)

def run_method(dls, dense, method, budget, lr, **kw):
    "Slim a copy of `dense` with `method` in `budget` epochs; return the table row"
    sparse = 1 if method in ('slimming', 'sss') else 0
    learn = learner(dls, copy.deepcopy(dense))
    t0 = time.time()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rep = learn.slim(method, sparse_epochs=sparse, prune_epochs=1 - sparse if method != 'sfp' else 1,
                         finetune_epochs=budget - 1, distill=False, lr=lr, measure_speed=False, **kw)
    pruned = next((s['accuracy'] for s in rep.stages if s['stage'].startswith('pruned')), None)
    x = dls.one_batch()[0][:1].cpu()
    return dict(method=method, pruned=pruned, final=rep.slim['accuracy'], params=rep.slim['params'],
                macs=rep.slim['macs'], min_width=min_conv_width(learn.model), latency=latency(learn.model, x),
                seconds=time.time() - t0, model=learn.model)

def scratch_row(name, learn, x, seconds):
    m = learn.model
    return dict(method=name, pruned=None, final=accuracy_of(learn), params=count_params(m), macs=count_macs(m, x),
                min_width=min_conv_width(m), latency=latency(m, x), seconds=seconds)

def print_table(rows, dense_row, target):
    f = lambda v: '-' if v is None else f'{v:.2%}'
    head = (f"{'method':12} {'pruned acc':>10} {'final acc':>10} {'params':>9} {'MACs':>11} {'MACs/dense':>10} "
            f"{'vs target':>9} {'min width':>9} {'bs32 ms':>8} {'time s':>7}")
    print(head); print('-' * len(head))
    for r in [dense_row] + rows:
        frac = r['macs'] / dense_row['macs']
        vs = f"{frac/target:.2f}x" if r['method'] in CHANNEL_METHODS else '-'
        print(f"{r['method']:12} {f(r['pruned']):>10} {f(r['final']):>10} {r['params']:>9,} {r['macs']:>11,} {frac:>10.3f} "
              f"{vs:>9} {r['min_width']:>9} {r['latency']*1e3:>8.1f} {r['seconds']:>7.0f}")

@call_parse
def main(
    data:str=str(ROOT.parent/'shared'/'data'/'mnist10k.npz'), # MNIST .npz (x uint8 N,28,28; y); x[:8000] trains
    quick:bool=True, # few epochs (dense 2, budget 2); --no-quick: dense 6, budget 4
    target_macs:float=0.3, # slim MACs as a fraction of dense, for the channel methods
    sss_ratio:float=0.5, # share of residual blocks 'sss' removes
    lr:float=1e-2, # one-cycle max learning rate of every stage
    methods:str=','.join(CHANNEL_METHODS + ('magnitude', 'sss')), # comma-separated subset to run
    scratch:bool=True, # add the Scratch-E and Scratch-B rows (l1's architecture)
    width:int=None, # stem / first-stage width of the ResNet-20 (stages width, 2x, 4x); default 8 with --quick, else 16
    threads:int=1, # CPU threads for training (more than the free cores oversubscribes OpenMP: 20x slower when shared)
    seed:int=0,
):
    "Train dense once, slim a copy with each method, print one comparison table"
    warnings.filterwarnings('ignore')
    t_start = time.time()
    dense_epochs, budget = (2, 2) if quick else (6, 4)
    torch.manual_seed(seed); torch.set_num_threads(threads)
    dls = npz_dls(data, n_train=8000, bs=128)
    x = dls.one_batch()[0][:1].cpu()
    w = width or (8 if quick else 16)
    dense = timm.create_model('fastslim_resnet20_cifar', num_classes=10, in_chans=1, stem_width=w, stage_widths=[w, 2*w, 4*w])
    t0 = time.time()
    learn = learner(dls, dense)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(dense_epochs, lr)
    dense_row = dict(method='dense', pruned=None, final=accuracy_of(learn), params=count_params(dense),
                     macs=count_macs(dense, x), min_width=min_conv_width(dense), latency=latency(dense, x),
                     seconds=time.time() - t0)
    print(f"dense ResNet-20 (width {w}, 28x28, 1 channel): {dense_row['final']:.2%} after {dense_epochs} epochs ({dense_row['seconds']:.0f}s)", flush=True)
    rows, names = [], methods.split(',')
    for m in [m for m in CHANNEL_METHODS if m in names]:
        rows.append(run_method(dls, dense, m, budget, lr, target_macs=target_macs, scope='global'))
        print(f"  {m}: {rows[-1]['final']:.2%}, MACs {rows[-1]['macs']/dense_row['macs']:.3f} of dense ({rows[-1]['seconds']:.0f}s)", flush=True)
    l1 = next((r for r in rows if r['method'] == 'l1'), None)
    if 'magnitude' in names:
        share = 1 - l1['params'] / dense_row['params'] if l1 else 1 - target_macs
        rows.append(run_method(dls, dense, 'magnitude', budget, lr, ratio=round(share, 3)))
        print(f"  magnitude: {share:.1%} of weights zeroed (l1's share of params removed)", flush=True)
    if 'sss' in names:
        rows.append(run_method(dls, dense, 'sss', budget, lr, ratio=sss_ratio))
        print(f"  sss: {sss_ratio:.0%} of blocks (own MACs)", flush=True)
    if scratch and l1:
        torch.manual_seed(seed)
        for name, f in (('scratch-E', lambda: scratch_e(dls, l1['model'], dense_epochs, lr=lr, seed=seed, loss_func=nn.CrossEntropyLoss())),
                        ('scratch-B', lambda: scratch_b(dls, l1['model'], dense_epochs, dense_row['macs'], lr=lr, seed=seed,
                                                        loss_func=nn.CrossEntropyLoss()))):
            t0 = time.time()
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):   # silence the progress bar
                warnings.simplefilter('ignore'); sl = f()
            rows.append(scratch_row(name, sl, x, time.time() - t0))
            print(f"  {name}: {rows[-1]['final']:.2%} ({rows[-1]['seconds']:.0f}s)", flush=True)
    print(f"\nMNIST-10k, ResNet-20, target MACs {target_macs:.0%} of dense, {budget} epochs after dense training "
          f"(dense {dense_epochs}); no distillation\n")
    print_table(rows, dense_row, target_macs)
    print(f"\n'vs target': achieved MACs fraction / target (1.00 = on budget). 'magnitude' zeroes weights (MACs unchanged); "
          f"'sss' removes {sss_ratio:.0%} of blocks. Scratch rows: l1's architecture, random init. Total {time.time()-t_start:.0f}s")
