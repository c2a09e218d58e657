"""Deployment benchmark on MNIST-10k: dense fp32 against the slim model in fp32 and in int8, post-training and
quantisation-aware (with and without the dense teacher), all measured in one run.

For each network (a VGG-style CNN with BatchNorm, and a CIFAR-style ResNet-20 with one input channel), trained on
x[:8000] (CPU, one thread): `learn.slim('l1', target_macs=0.1, round_to=8)` (10x fewer MACs, every width a multiple of 8, distillation
fine-tuning), then

- slim int8 PTQ (ORT):   ONNX Runtime's static QDQ quantisation of the fp32 ONNX file (`quantize_onnx`);
- slim int8 PTQ (PT2E):  torchao's PT2E calibration (`quantize_pt2e`), written with `export_int8_onnx`;
- slim int8 QAT:         `qat_epochs` of `QuantizeCallback` at a tenth of the learning rate, no teacher;
- slim int8 QAT+KD:      the same with the dense network as `DistillCallback` teacher (what `learn.slim(quantize='qat')` runs).

Prints file size, median onnxruntime/PyTorch CPU latency (one thread, batch 1 and 32) and test accuracy (x[8000:]),
then the goals of issue #21: QAT+KD int8 within 0.3 point of slim fp32 and at least PTQ's accuracy; slim int8 at
least 8x smaller and 4x faster (batch 32, onnxruntime) than dense fp32.

    python bench/deploy.py                       # both networks, about 10-15 minutes on one core
    python bench/deploy.py --nets vgg            # one network
"""
import copy, tempfile, time
from pathlib import Path
import torch
from torch import nn
from fastcore.script import call_parse
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastslim.core import count_macs, count_params
from fastslim.data import npz_dls
from fastslim.distill import DistillCallback
from fastslim.export import export_onnx, quantize_onnx, quantize_pt2e, deploy_report
from fastslim.models import CifarResNet
from fastslim.quantize import QuantizeCallback, export_int8_onnx
from fastslim.slim import accuracy_of
import fastslim.slim  # patches Learner.slim

ROOT = Path(__file__).resolve().parents[1]

def vgg_bn(c=(32, 64, 128), n_out=10):
    "VGG-style: two 3x3 conv-BN-ReLU per stage, max-pool between stages, global average pool, linear head"
    layers, c_in = [], 1
    for i, w in enumerate(c):
        if i: layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c_in = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_out))

NETS = {'vgg': vgg_bn, 'resnet20': lambda: CifarResNet(20, in_channels=1)}

def quiet(learn): return learn.no_bar(), learn.no_logging()

def fit(learn, epochs, lr, cbs=None):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return accuracy_of(learn)

def qat(slim_model, dense, dls, epochs, lr, teacher:bool):
    "A QAT int8 copy of `slim_model`: `epochs` of fake quantisation at `lr`, with `dense` distilling if `teacher`"
    set_seed(0)
    learn = Learner(dls, copy.deepcopy(slim_model), metrics=accuracy)
    cbs = [QuantizeCallback()] + ([DistillCallback(copy.deepcopy(dense).eval())] if teacher else [])
    fit(learn, epochs, lr, cbs)
    return learn.model

def one_net(name, dls, epochs, ft_epochs, qat_epochs, lr, n, threads, d, round_to):
    "The deployment table of one network, and its goal lines"
    t0 = time.time()
    set_seed(0)
    learn = Learner(dls, NETS[name](), metrics=accuracy)
    acc = fit(learn, epochs, lr)
    dense, x1 = copy.deepcopy(learn.model).eval(), dls.one_batch()[0][:1]
    print(f"{name} dense: {count_params(dense):,} params, {count_macs(dense, x1):,} MACs, accuracy {acc:.4f} ({time.time()-t0:.0f}s)")
    with learn.no_bar(), learn.no_logging():
        r = learn.slim('l1', target_macs=0.1, round_to=round_to, prune_epochs=1, finetune_epochs=ft_epochs, lr=lr, measure_speed=False)
    small = copy.deepcopy(learn.model).eval()
    print(f"{name} slim: {count_params(small):,} params, {count_macs(small, x1):,} MACs ({count_macs(dense, x1)/count_macs(small, x1):.1f}x fewer), "
          f"accuracy {r.slim['accuracy']:.4f} ({time.time()-t0:.0f}s)")
    p = Path(d)/name; p.mkdir()
    fp = export_onnx(small, p/'slim.onnx', example=dls.one_batch()[0])
    models = {'dense fp32 PyTorch': dense, 'slim fp32 PyTorch': small, 'slim fp32 ONNX': fp.path,
              'slim int8 PTQ (ORT)': quantize_onnx(fp, dls.train, p/'ptq_ort.onnx', n_batches=8)}
    agree = {}
    for label, q in [('slim int8 PTQ (PT2E)', lambda: quantize_pt2e(small, dls.train, example=dls.one_batch()[0])),
                     ('slim int8 QAT', lambda: qat(small, dense, dls, qat_epochs, lr/10, teacher=False)),
                     ('slim int8 QAT+KD', lambda: qat(small, dense, dls, qat_epochs, lr/10, teacher=True))]:
        res = export_int8_onnx(q(), p/f'{label.split()[-1].strip("()").lower()}.onnx', dls.valid)
        models[label], agree[label] = res['path'], res
        print(f"{name} {label}: onnxruntime and PyTorch int8 agree on {res['agreement']:.1%} (largest logit difference {res['max_logit_diff']:.3g}) ({time.time()-t0:.0f}s)")
    rep = deploy_report(models, dls.valid, bs=(1, 32), n=n, threads=threads)
    rows = {row['name']: row for row in rep.rows}
    k, fp32 = rows['slim int8 QAT+KD'], rows['slim fp32 PyTorch']
    best_ptq = max(rows['slim int8 PTQ (ORT)']['acc'], rows['slim int8 PTQ (PT2E)']['acc'])
    r = rep.ratios('slim int8 QAT+KD')
    goals = [('accuracy vs slim fp32', k['acc'] >= fp32['acc'] - 0.003, f"{100*(k['acc'] - fp32['acc']):+.2f} points (goal >= -0.3)"),
             ('accuracy vs PTQ', k['acc'] >= best_ptq, f"{100*(k['acc'] - best_ptq):+.2f} points against the better PTQ (goal >= 0)"),
             ('size vs dense fp32', r['smaller'] >= 8, f"{r['smaller']:.1f}x smaller (goal >= 8x)"),
             ('latency vs dense fp32', r['faster_bs32'] >= 4, f"{r['faster_bs32']:.1f}x faster at batch 32 (goal >= 4x)")]
    lines = [f"## {name}: {time.time()-t0:.0f}s", str(rep)]
    lines += [f"{name} slim int8 QAT+KD, {g}: {msg} {'OK' if ok else 'MISSED'}" for g, ok, msg in goals]
    return '\n'.join(lines)

@call_parse
def main(
    data:str=str(ROOT.parent/'shared'/'data'/'mnist10k.npz'), # MNIST .npz (x uint8 N,28,28; y); x[:8000] trains
    nets:str='vgg,resnet20', # comma-separated: vgg, resnet20
    epochs:int=3, # epochs to train each dense network
    ft_epochs:int=3, # distillation fine-tuning epochs of learn.slim
    qat_epochs:int=2, # epochs of quantisation-aware training
    lr:float=3e-3, # one-cycle max learning rate (QAT: a tenth of it)
    n:int=30, # timed runs per latency (median reported)
    threads:int=1, # CPU threads for training and timing
    round_to:int=8, # every pruned width a multiple of this (0: no rounding)
):
    "Dense, slim fp32, slim int8 (PTQ two ways, QAT with and without the teacher): the deployment table of each network"
    t0 = time.time()
    torch.set_num_threads(threads)
    dls = npz_dls(data, n_train=8000, bs=128)
    with tempfile.TemporaryDirectory() as d:
        out = [one_net(name, dls, epochs, ft_epochs, qat_epochs, lr, n, threads, d, round_to or None) for name in nets.split(',')]
    print(f"\n# bench/deploy.py --nets {nets} --epochs {epochs} --ft-epochs {ft_epochs} --qat-epochs {qat_epochs} --round-to {round_to} ({time.strftime('%Y-%m-%d')})\n")
    print('\n\n'.join(out))
    print(f"total {time.time()-t0:.0f}s")
