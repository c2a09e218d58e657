"""Deployment benchmark on MNIST-10k: dense fp32 PyTorch against the slim model in PyTorch, ONNX fp32 and ONNX int8.

Trains a VGG-style CNN with BatchNorm on x[:8000] (CPU, one thread), slims it with fastslim's plan (L1 filter
norms, the same share removed in every layer), fine-tunes briefly, exports to ONNX, quantises to int8 (static, QDQ),
and prints size, median CPU latency (one thread, batch 1 and 32) and test accuracy (x[8000:]) measured in this run.
Goal: slim + int8 at least 8x smaller and 4x faster (batch 32) than dense fp32 PyTorch, accuracy within 0.5 point.

    python bench/deploy.py                 # about 3-5 minutes on one core
    python bench/deploy.py --pt2e          # adds torchao's PT2E int8 row (pip install torchao; compiles, +1 minute)
"""
import copy, tempfile, time
from pathlib import Path
import torch
from torch import nn
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastslim.core import count_macs, count_params
from fastslim.data import npz_dls
from fastslim.export import export_onnx, quantize_onnx, quantize_pt2e, deploy_report

ROOT = Path(__file__).resolve().parents[1]

def vgg_bn(c=(32, 64, 128), n_out=10):
    "VGG-style: two 3x3 conv-BN-ReLU per stage, max-pool between stages, global average pool, linear head"
    layers, c_in = [], 1
    for i, w in enumerate(c):
        if i: layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_out))

def fit(learn, epochs, lr):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return validate(learn)

def validate(learn):
    with learn.no_bar(): return float(learn.validate()[1])

def slim(dense, dls, ratio, ft_epochs, lr):
    "A compacted copy of `dense` with `ratio` of every layer's channels removed (L1 norm), briefly fine-tuned"
    from fastslim.plan import SlimPlan
    model = copy.deepcopy(dense)
    plan = SlimPlan(model, dls.one_batch()[0][:2])
    plan.select(plan.l1_scores(), ratio=ratio, scope='local').apply()
    learn = Learner(dls, plan.compact(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    # hard masks keep pruned weights at zero, so fine-tuning the compacted model equals fine-tuning the masked one
    print(f"slim before fine-tune: accuracy {validate(learn):.4f}")
    return learn.model, fit(learn, ft_epochs, lr)

@call_parse
def main(
    data:str=str(ROOT.parent/'shared'/'data'/'mnist10k.npz'), # MNIST .npz (x uint8 N,28,28; y); x[:8000] trains
    ratio:float=0.5, # share of each layer's channels the slim model removes
    epochs:int=3, # epochs to train the dense model
    ft_epochs:int=2, # fine-tuning epochs after slimming
    lr:float=3e-3, # one-cycle max learning rate
    n:int=30, # timed runs per latency (median reported)
    threads:int=1, # CPU threads for training and timing
    pt2e:bool=False, # also time torchao's PT2E int8 (compiled with inductor; needs `pip install torchao`)
):
    "Train dense, slim, export, quantise; print the deployment table with ratios against dense fp32 PyTorch"
    t0 = time.time()
    torch.manual_seed(0); torch.set_num_threads(threads)
    dls = npz_dls(data, n_train=8000, bs=128)
    dense = vgg_bn()
    acc = fit(Learner(dls, dense, loss_func=nn.CrossEntropyLoss(), metrics=accuracy), epochs, lr)
    print(f"dense: {count_params(dense):,} params, {count_macs(dense, dls.one_batch()[0][:1]):,} MACs, accuracy {acc:.4f} ({time.time()-t0:.0f}s)")
    small, acc = slim(dense, dls, ratio, ft_epochs, lr)
    print(f"slim:  {count_params(small):,} params, {count_macs(small, dls.one_batch()[0][:1]):,} MACs, accuracy {acc:.4f} ({time.time()-t0:.0f}s)")
    with tempfile.TemporaryDirectory() as d:
        res = export_onnx(small, Path(d)/'slim.onnx', example=dls.one_batch()[0])
        q = quantize_onnx(res, dls.train, Path(d)/'slim_int8.onnx', n_batches=8)
        print(f"ONNX: {res}")
        models = {'dense fp32 PyTorch': dense, 'slim fp32 PyTorch': small, 'slim fp32 ONNX': res, 'slim int8 ONNX': q}
        if pt2e: models['slim int8 PT2E compiled'] = quantize_pt2e(small, dls.train, example=dls.one_batch()[0], compile=True)
        rep = deploy_report(models, dls.valid, bs=(1, 32), n=n, threads=threads)
    print(f"\n{rep}\n")
    r = rep.ratios('slim int8 ONNX')
    goals = [('size', r['smaller'] >= 8, f"{r['smaller']:.1f}x smaller (goal >= 8x)"),
             ('latency', r['faster_bs32'] >= 4, f"{r['faster_bs32']:.1f}x faster at batch 32 (goal >= 4x)"),
             ('accuracy', r['acc_delta'] >= -0.005, f"{100*r['acc_delta']:+.2f} points (goal >= -0.5)")]
    for name, ok, msg in goals: print(f"slim int8 ONNX vs dense fp32 PyTorch, {name}: {msg} {'OK' if ok else 'MISSED'}")
    print(f"total {time.time()-t0:.0f}s")
