"""fastslim under fastai's distributed training (issue #18): two gloo processes on the CPU, launched with
`torch.distributed.run`, run every callback and `learn.slim` inside `learn.distrib_ctx()` (tests/dist_worker.py).

Both ranks must end with identical masks and bit-identical (compacted) weights; data-driven criteria must reduce their
statistics over the ranks, so that their scores equal a single process's on the same batches; and the compacted model
must match a single-process run of the same seed and global batch: the same widths, and accuracy within
`ACC_TOL` (the ranks normalise BatchNorm over their half of each batch, `sync_bn=False`, so training differs slightly)."""
import os, subprocess, sys
from copy import deepcopy
from functools import partial
from pathlib import Path
import pytest, torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fastai.torch_core import set_seed
from fastslim.all import (digits_dls, digits_folder, PruneCallback, DistillCallback, SparsityCallback, MaskCallback, plan_of, top1)
from fastslim.distrib import unwrap
from fastslim.test_utils import digits_cnn
pytestmark = pytest.mark.xdist_group('distributed')   # the 2-rank runs (a module fixture) are launched once, on one worker

pytest.importorskip('accelerate', reason='the `dist` extra (accelerate) is needed for fastai.distributed')
WORKER = Path(__file__).with_name('dist_worker.py')
SCENARIOS = ['scores', 'fit', 'iterative', 'criteria', 'images', 'sparse', 'blocks', 'slim']
ACC_TOL = 0.03   # accuracy, 2 ranks against 1 process (same seed, same global batch)
TIMEOUT = 600    # seconds per launch: a hang (mismatched collectives) fails instead of blocking CI

def _launch(out, dense, nproc):
    "Start tests/dist_worker.py in `nproc` processes (1: a plain python process) writing into `out`"
    out.mkdir()
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc > 1 else [])
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.Popen(cmd + [str(WORKER), str(out), str(dense), *SCENARIOS], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)

def _wait(p, what):
    try: log, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill(); log, _ = p.communicate()
        pytest.fail(f"{what} did not finish in {TIMEOUT}s (a hang?):\n{log[-4000:]}")
    assert p.returncode == 0, f"{what} failed:\n{log[-6000:]}"
    return log

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The dense network trained here, then the worker's scenarios on 2 ranks and in 1 process, side by side"
    tmp = tmp_path_factory.mktemp('dist')
    set_seed(0)
    learn = Learner(digits_dls(bs=64), digits_cnn(), metrics=accuracy, opt_func=partial(SGD, mom=0.9))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 0.05)
    torch.save(learn.model.state_dict(), tmp/'dense.pt')
    digits_folder(tmp/'images', size=32, per_class=20)          # for the `images` scenario: fastai's ImageDataLoaders
    two, one = _launch(tmp/'two', tmp/'dense.pt', 2), _launch(tmp/'one', tmp/'dense.pt', 1)
    logs = _wait(two, '2-process run'), _wait(one, 'single-process run')
    assert 'rank 0 of 2' in logs[0] and 'rank 1 of 2' in logs[0] and 'rank 0 of 1' in logs[1]
    load = lambda d, n, r: torch.load(tmp/d/f'{n}.{r}.pt', weights_only=False)
    return {n: (load('two', n, 0), load('two', n, 1), load('one', n, 0)) for n in SCENARIOS} | {'dense': learn.model.state_dict()}

def _same(a, b):
    "Exactly equal: tensors bit for bit, containers item by item"
    if isinstance(a, dict): return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor): return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b

def _rel(a, b): return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

def _widths(sd): return [tuple(v.shape) for k, v in sd.items() if k.endswith('weight')]

@pytest.mark.parametrize('scenario', SCENARIOS)
def test_both_ranks_end_identical(runs, scenario):
    "Masks, compacted weights, BatchNorm statistics, logs and records: the same on both ranks, bit for bit"
    r0, r1, _ = runs[scenario]
    assert r0.keys() == r1.keys()
    bad = [k for k in r0 if not _same(r0[k], r1[k])]
    assert not bad, f"{scenario}: the ranks differ in {bad}"

def test_data_driven_criteria_reduce_over_ranks(runs):
    "Each rank scores its half of every batch; reduced over the ranks, the scores are the single process's on the whole batches"
    two, _, one = runs['scores']
    for crit, tol in [('taylor', 1e-4), ('thinet', 1e-6), ('regression', 1e-6)]:
        a, b = two['scores'][crit], one['scores'][crit]
        assert a.keys() == b.keys()
        worst = max(_rel(a[g], b[g]) for g in a)
        assert worst < tol, f"{crit}: 2 ranks differ from 1 process by {worst:.2e} (relative)"

def test_distributed_fit_compacts_like_one_process(runs):
    "PruneCallback + DistillCallback in a 2-rank fit: compacted, unwrapped after fit, widths and accuracy as one process"
    two, _, one = runs['fit']
    dense = runs['dense']
    assert two['wrapped'] == 'Sequential'                                  # fastai took the compacted model out of DDP
    assert sum(v.numel() for v in two['state'].values()) < 0.7 * sum(v.numel() for v in dense.values())
    assert _widths(two['state']) == _widths(one['state'])                   # the same channels kept (one-shot L1, same weights)
    assert abs(two['accuracy'] - one['accuracy']) <= ACC_TOL, (two['accuracy'], one['accuracy'])
    assert two['teacher_same'] and not any(two['teacher_grads'])            # the teacher: never wrapped, never trained

def test_distributed_schedule_honours_its_end(runs):
    "An AGP schedule ending at 75% of training takes every step within each rank's first 75% of iterations"
    two, _, one = runs['iterative']
    for r in (two, one):
        steps = [s['iter'] for s in r['log']]
        assert len(steps) == 3 and steps[0] == 0 and steps[-1] <= 0.75 * r['n_iter'], (steps, r['n_iter'])
        assert abs(r['log'][-1]['kept'] / r['log'][-1]['total'] - 0.5) < 0.05
    assert _widths(two['state']) != _widths(runs['dense'])                  # compacted at the end

def test_every_criterion_prunes_under_two_ranks(runs):
    "Every channel criterion, on one-shot, iterative and AGP schedules: compacted to the same widths on both ranks (above)"
    two, _, _ = runs['criteria']
    dense = _widths(runs['dense'])
    for crit, sd in two.items(): assert _widths(sd) != dense, f"{crit} did not compact"

def test_image_folder_and_timm_model_under_two_ranks(runs):
    "TensorImage batches from ImageDataLoaders and a timm ResNet-18: pruned to half the MACs and compacted on both ranks"
    two, _, one = runs['images']
    assert two['batch'] == 'TensorImage'
    assert _widths(two['state']) == _widths(one['state'])                   # one-shot L1 from the same initial weights
    assert two['state']['conv1.weight'].shape[0] < 64                       # compacted: the stem lost channels

def test_distributed_sparsity_and_masks(runs):
    "Steered sparsity (BN scales, group lasso) and unstructured masks held by MaskCallback under 2 ranks"
    two, _, one = runs['sparse']
    w = {k: v for k, v in two['weights'].items() if k.endswith('.weight') and v.ndim > 1}
    zero = sum(int((v == 0).sum()) for v in w.values()) / sum(v.numel() for v in w.values())
    assert zero > 0.5, zero                                                 # 60% of the prunable weights, held at zero
    for target in ('bn', 'groups'):
        assert not _same(two[target], runs['dense']), target                # the penalty moved the weights

def test_distributed_slim_writes_once_and_resumes(runs):
    "`learn.slim` on 2 ranks: one set of checkpoints, a resume that finds every stage done, MACs as one process"
    two, _, one = runs['slim']
    assert two['files'] == ['dense.pt', 'finetune.pt', 'progress.json', 'prune.pt', 'sparse.pt']
    assert _same(two['resumed'], two['state'])
    assert [s['stage'] for s in two['stages']] == [s['stage'] for s in one['stages']]
    assert two['stages'][-1]['macs'] == one['stages'][-1]['macs']
    assert abs(two['stages'][-1]['accuracy'] - one['stages'][-1]['accuracy']) <= ACC_TOL

def test_compact_rewraps_data_parallel():
    "`Learner.compact` on a wrapped model: the plan is on the module inside, and the compacted one is wrapped again"
    learn = Learner(digits_dls(bs=64), digits_cnn(), opt_func=partial(SGD, mom=0.9))
    plan = PruneCallback(ratio=0.5).prune_now(learn)
    learn.model = torch.nn.DataParallel(learn.model)
    new = learn.compact(plan)
    assert isinstance(learn.model, torch.nn.DataParallel) and unwrap(learn.model) is new
    assert new[0].out_channels < 32
    assert {id(p) for p in learn.opt.all_params(with_grad=False).itemgot(0)} == {id(p) for p in new.parameters()}

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU: fp16 training of every callback on one GPU')
def test_every_callback_under_fp16_on_gpu():
    "On one GPU with `to_fp16()`: sparsity, pruning, masks and distillation train, and the compacted model runs in fp16"
    dls = digits_dls(bs=64, device='cuda')
    learn = Learner(dls, digits_cnn(), metrics=accuracy, opt_func=partial(SGD, mom=0.9)).to_fp16()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 0.05)
        teacher = deepcopy(learn.model)
        learn.fit(1, 0.02, cbs=SparsityCallback(target_macs=0.5))
        learn.fit(1, 0.02, cbs=[PruneCallback(target_macs=0.5, criterion='taylor', compact_at_end=True), DistillCallback(teacher)])
        learn.fit(1, 0.01, cbs=MaskCallback(plan_of(learn.model)) if plan_of(learn.model) else [])
    assert top1(learn.model, dls) > 0.8
    assert learn.model[0].out_channels < 32

def test_command_line_on_two_processes(tmp_path):
    "`torchrun -m fastslim slim`: every rank trains, rank 0 alone prints the report and writes the output folder"
    out = tmp_path/'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'fastslim', 'slim',
           '--dense-epochs', '2', '--sparse-epochs', '1', '--finetune-epochs', '1', '--out', str(out)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', 'PYTHONWARNINGS': 'ignore'}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('dense/slim') == 1 and r.stdout.count('fastslim: wrote') == 1   # one report, one writer
    assert r.stdout.count('fastslim: stage 1/3') == 1
    assert {'slim.pt', 'report.json', 'run.json', 'meta.json'} <= {p.name for p in out.iterdir()}
