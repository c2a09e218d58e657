"""Deployment benchmark on MNIST-10k: dense fp32 against the slim model in fp32 and in int8, post-training and
quantisation-aware (with and without the dense teacher), all measured in one run.

For each network (a VGG-style CNN with BatchNorm, a CIFAR-style ResNet-20 and timm's ResNet-18, all with one input channel), trained on
x[:8000] (CPU, one thread): `learn.slim('l1', target_macs=0.1, round_to=8)` (10x fewer MACs, every width a multiple of 8, distillation
fine-tuning), then

- slim int8 PTQ (ORT):   ONNX Runtime's static QDQ quantisation of the fp32 ONNX file (`quantize_onnx`);
- slim int8 PTQ (PT2E):  torchao's PT2E calibration (`quantize_pt2e`), written with `export_int8_onnx`;
- slim int8 QAT:         `qat_epochs` of `QuantizeCallback` at a tenth of the learning rate, no teacher;
- slim int8 QAT+KD:      the same with the dense network as `DistillCallback` teacher (what `learn.slim(quantize='qat')` runs).

QAT runs once per seed (`--seeds`); the table shows seed 0's int8 model, and the goal lines the mean and spread of
the accuracy over the seeds. Prints file size, median onnxruntime/PyTorch CPU latency (one thread, batch 1 and 32;
the timed runs of all rows interleaved in rounds, so a burst of load slows every row alike) and test accuracy
(x[8000:]), then the goals of issue #21: QAT+KD int8 within 0.3 point of slim fp32 and at least PTQ's accuracy;
slim int8 at least 8x smaller and 4x faster (batch 32, onnxruntime) than dense fp32 -- against dense fp32 in
PyTorch and in onnxruntime, both stated.

    python bench/deploy.py                       # vgg and resnet20, about 25 minutes on one core
    python bench/deploy.py --nets timm_resnet18  # timm's ResNet-18 (in_chans=1)
    python bench/deploy.py --kernels             # ORT int8 formats against fp32 at conv widths 8-64, a minute
"""
import contextlib, copy, statistics, tempfile, time
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
from fastslim.export import export_onnx, quantize_onnx, quantize_pt2e, deploy_report, onnx_accuracy
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

def timm_net(name):
    import timm
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, in_chans=1)

NETS = {'vgg': vgg_bn, 'resnet20': lambda: CifarResNet(20, in_channels=1), 'timm_resnet18': timm_net('resnet18')}

def quiet(learn): return learn.no_bar(), learn.no_logging()

def fit(learn, epochs, lr, cbs=None):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return accuracy_of(learn)

def qat(slim_model, dense, dls, epochs, lr, teacher:bool, seed:int=0):
    "A QAT int8 copy of `slim_model`: `epochs` of fake quantisation at `lr`, with `dense` distilling if `teacher`"
    set_seed(seed)
    learn = Learner(dls, copy.deepcopy(slim_model), metrics=accuracy)
    cbs = [QuantizeCallback()] + ([DistillCallback(copy.deepcopy(dense).eval())] if teacher else [])
    fit(learn, epochs, lr, cbs)
    return learn.model

def one_net(name, dls, epochs, ft_epochs, qat_epochs, lr, n, threads, d, round_to, seeds):
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
    p = Path(d)/name; p.mkdir(exist_ok=True)
    example = dls.one_batch()[0]
    fp = export_onnx(small, p/'slim.onnx', example=example)
    models = {'dense fp32 PyTorch': dense, 'dense fp32 ONNX': export_onnx(dense, p/'dense.onnx', example=example).path,
              'slim fp32 PyTorch': small, 'slim fp32 ONNX': fp.path,
              'slim int8 PTQ (ORT)': quantize_onnx(fp, dls.train, p/'ptq_ort.onnx', n_batches=8)}
    qat_acc = {}
    jobs = [('slim int8 PTQ (PT2E)', 0, lambda s: quantize_pt2e(small, dls.train, example=example))]
    jobs += [(label, s, lambda s, kd=kd: qat(small, dense, dls, qat_epochs, lr/10, teacher=kd, seed=s))
             for label, kd in [('slim int8 QAT', False), ('slim int8 QAT+KD', True)] for s in range(seeds)]
    for label, s, q in jobs:
        res = export_int8_onnx(q(s), p/f'{label.split()[-1].strip("()").lower()}_{s}.onnx', dls.valid)
        if s == 0: models[label] = res['path']
        else: qat_acc.setdefault(label, []).append(onnx_accuracy(res['path'], dls.valid))
        print(f"{name} {label} (seed {s}): onnxruntime and PyTorch int8 agree on {res['agreement']:.1%} (largest logit difference {res['max_logit_diff']:.3g}) ({time.time()-t0:.0f}s)")
    rep = deploy_report(models, dls.valid, bs=(1, 32), n=n, threads=threads)
    rows = {row['name']: row for row in rep.rows}
    for label in ('slim int8 QAT', 'slim int8 QAT+KD'): qat_acc[label] = [rows[label]['acc']] + qat_acc.get(label, [])
    accs, fp32 = qat_acc['slim int8 QAT+KD'], rows['slim fp32 PyTorch']
    k = statistics.mean(accs)
    best_ptq = max(rows['slim int8 PTQ (ORT)']['acc'], rows['slim int8 PTQ (PT2E)']['acc'])
    r, kd = rep.ratios('slim int8 QAT+KD'), rows['slim int8 QAT+KD']
    vs_onnx = rows['dense fp32 ONNX']['lat_bs32'] / kd['lat_bs32']
    over = f"mean of {len(accs)} seeds" if len(accs) > 1 else "one seed"
    goals = [('accuracy vs slim fp32', k >= fp32['acc'] - 0.003, f"{100*(k - fp32['acc']):+.2f} points, {over} (goal >= -0.3)"),
             ('accuracy vs PTQ', k >= best_ptq, f"{100*(k - best_ptq):+.2f} points against the better PTQ, {over} (goal >= 0)"),
             ('size vs dense fp32', r['smaller'] >= 8, f"{r['smaller']:.1f}x smaller (goal >= 8x)"),
             ('latency vs dense fp32 PyTorch', r['faster_bs32'] >= 4, f"{r['faster_bs32']:.1f}x faster at batch 32 (goal >= 4x)"),
             ('latency vs dense fp32 ONNX', vs_onnx >= 4, f"{vs_onnx:.1f}x faster at batch 32 (goal >= 4x)")]
    lines = [f"## {name}: {time.time()-t0:.0f}s", str(rep)]
    for label, a in qat_acc.items():
        if len(a) > 1: lines.append(f"{name} {label} accuracy over seeds 0-{len(a)-1}: {', '.join(f'{v:.4f}' for v in a)} "
                                    f"(mean {statistics.mean(a):.4f}, spread {max(a) - min(a):.4f})")
    lines += [f"{name} slim int8 QAT+KD, {g}: {msg} {'OK' if ok else 'MISSED'}" for g, ok, msg in goals]
    return '\n'.join(lines)

FILES = {'dense fp32 ONNX': 'dense.onnx', 'slim fp32 ONNX': 'slim.onnx', 'slim int8 PTQ (ORT)': 'ptq_ort.onnx',
         'slim int8 PTQ (PT2E)': 'pt2e_0.onnx', 'slim int8 QAT': 'qat_0.onnx', 'slim int8 QAT+KD': 'qat+kd_0.onnx'}

def time_onnx(folder, dls, n, threads, rounds=5):
    "The ONNX files a run kept in `folder`, re-timed in interleaved rounds by wall clock and by the thread's CPU time"
    from fastslim.export import ort_session
    names = {k: Path(folder)/f for k, f in FILES.items() if (Path(folder)/f).is_file()}
    x = torch.as_tensor(dls.valid.one_batch()[0][:32]).as_subclass(torch.Tensor).cpu().numpy()
    sess = {k: ort_session(p, threads=threads) for k, p in names.items()}
    t = {(k, b, c): [] for k in sess for b in (1, 32) for c in ('wall', 'cpu')}
    for r in range(rounds):
        for k, s in sess.items():
            for b in (1, 32):
                feed = {s.get_inputs()[0].name: x[:b]}
                for i in range(n // rounds + (1 if r == 0 else 0)):
                    w0, c0 = time.perf_counter(), time.thread_time(); s.run(None, feed)
                    w1, c1 = time.perf_counter(), time.thread_time()
                    if r or i: t[k, b, 'wall'].append(w1 - w0); t[k, b, 'cpu'].append(c1 - c0)
    med = {key: statistics.median(v) * 1e3 for key, v in t.items()}
    base = 'dense fp32 ONNX'
    head = f"{'model':<22} {'wall bs1':>9} {'wall bs32':>10} {'cpu bs1':>9} {'cpu bs32':>9} {'x faster (cpu bs32)':>20}"
    lines = [f"## {Path(folder).name}: ONNX files re-timed (ms, medians of {n}; cpu = the thread's CPU time, which other processes do not inflate)", head, '-'*len(head)]
    for k in sess:
        lines.append(f"{k:<22} {med[k, 1, 'wall']:9.3f} {med[k, 32, 'wall']:10.3f} {med[k, 1, 'cpu']:9.3f} {med[k, 32, 'cpu']:9.3f} "
                     f"{med[base, 32, 'cpu'] / med[k, 32, 'cpu'] if base in sess else float('nan'):20.2f}")
    return '\n'.join(lines)

def cpu_flags():
    "The int8-relevant x86 instruction sets this CPU reports (AVX2, AVX-512, VNNI), from /proc/cpuinfo"
    try: flags = set(next(l for l in open('/proc/cpuinfo') if l.startswith('flags')).split(':')[1].split())
    except (OSError, StopIteration): return 'unknown'
    return ', '.join(f for f in ('avx2', 'avx512f', 'avx512_vnni', 'avx_vnni', 'amx_int8') if f in flags) or 'none of avx2/avx512/vnni'

KERNEL_FORMATS = {   # ONNX Runtime's static quantisation settings a user could pick
    'QDQ u8s8 per-channel': dict(fmt='QDQ', act='QUInt8', w='QInt8', pc=True),   # fastslim's (`quantize_onnx`)
    'QDQ u8s8 per-tensor': dict(fmt='QDQ', act='QUInt8', w='QInt8', pc=False),
    'QDQ s8s8 per-channel': dict(fmt='QDQ', act='QInt8', w='QInt8', pc=True),
    'QDQ u8u8 per-channel': dict(fmt='QDQ', act='QUInt8', w='QUInt8', pc=True),
    'QOperator u8s8 per-channel': dict(fmt='QOperator', act='QUInt8', w='QInt8', pc=True)}

def kernel_table(widths=(8, 16, 32, 64), n=15, bs=32, hw=28):
    "Four 3x3 conv+ReLU layers of each width at `hw`x`hw`, batch `bs`: fp32 against every ORT int8 format, the thread's CPU ms"
    from onnxruntime.quantization import quantize_static, CalibrationDataReader, QuantFormat, QuantType
    from fastslim.export import ort_session
    class Calib(CalibrationDataReader):
        def __init__(self, c): self.it = iter([{'x': torch.randn(bs, c, hw, hw).numpy()} for _ in range(4)])
        def get_next(self): return next(self.it, None)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for c in widths:
            torch.manual_seed(0)
            m = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()) for _ in range(4)]).eval()
            fp = Path(d)/f'fp32_{c}.onnx'
            torch.onnx.export(m, (torch.randn(bs, c, hw, hw),), fp, input_names=['x'], output_names=['y'], dynamo=False, opset_version=17)
            files = {'fp32': fp}
            for k, f in KERNEL_FORMATS.items():
                files[k] = Path(d)/f'{k.replace(" ", "_")}_{c}.onnx'
                quantize_static(str(fp), str(files[k]), Calib(c), quant_format=getattr(QuantFormat, f['fmt']), per_channel=f['pc'],
                                activation_type=getattr(QuantType, f['act']), weight_type=getattr(QuantType, f['w']))
            sess, x = {k: ort_session(f) for k, f in files.items()}, torch.randn(bs, c, hw, hw).numpy()
            t = {k: [] for k in sess}
            for r in range(n + 1):   # interleaved; the first round warms up
                for k, s in sess.items():
                    c0 = time.thread_time(); s.run(None, {'x': x}); c1 = time.thread_time()
                    if r: t[k].append(c1 - c0)
            rows[c] = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    head = f"{'format':<28}" + ''.join(f"{f'{c} ch':>16}" for c in widths)
    lines = [f"## int8 kernels: four 3x3 convs, {hw}x{hw}, batch {bs}, one thread; the thread's CPU ms, median of {n} "
             f"(int8 / fp32 in brackets); CPU: {cpu_flags()}", head, '-'*len(head)]
    def cell(c, k): return f"{rows[c][k]:9.2f}" + ('' if k == 'fp32' else f" ({rows[c][k] / rows[c]['fp32']:.2f})").rjust(7)
    lines += [f"{k:<28}" + ''.join(cell(c, k) for c in widths) for k in ['fp32', *KERNEL_FORMATS]]
    return '\n'.join(lines)

@call_parse
def main(
    data:str=str(ROOT.parent/'shared'/'data'/'mnist10k.npz'), # MNIST .npz (x uint8 N,28,28; y); x[:8000] trains
    nets:str='vgg,resnet20', # comma-separated: vgg, resnet20, timm_resnet18
    epochs:int=3, # epochs to train each dense network
    ft_epochs:int=3, # distillation fine-tuning epochs of learn.slim
    qat_epochs:int=2, # epochs of quantisation-aware training
    lr:float=3e-3, # one-cycle max learning rate (QAT: a tenth of it)
    n:int=30, # timed runs per latency (median reported)
    threads:int=1, # CPU threads for training and timing
    round_to:int=8, # every pruned width a multiple of this (0: no rounding)
    seeds:int=2, # QAT runs per variant (seeds 0..seeds-1): accuracy mean and spread
    keep:str=None, # keep the ONNX files in this folder (one subfolder a network) instead of a temporary one
    time_only:str=None, # re-time the ONNX files kept in these comma-separated folders (see `keep`), no training
    kernels:bool=False, # only time ORT's int8 formats against fp32 on plain conv stacks of widths 8-64 (why narrow nets gain nothing from int8 on CPUs without VNNI)
):
    "Dense, slim fp32, slim int8 (PTQ two ways, QAT with and without the teacher): the deployment table of each network"
    t0 = time.time()
    if kernels:
        torch.set_num_threads(threads)
        print(f"# bench/deploy.py --kernels ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
        print(kernel_table(n=n)); return
    bad = [] if time_only else [k for k in nets.split(',') if k not in NETS]
    if bad: raise SystemExit(f"--nets: unknown network(s) {bad}; choose from {list(NETS)}")
    torch.set_num_threads(threads)
    dls = npz_dls(data, n_train=8000, bs=128)
    if time_only:
        print(f"# bench/deploy.py --time-only {time_only} --n {n} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
        print('\n\n'.join(time_onnx(f, dls, n, threads) for f in time_only.split(',')))
        return
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory()) as d:
        Path(d).mkdir(parents=True, exist_ok=True)
        out = [one_net(name, dls, epochs, ft_epochs, qat_epochs, lr, n, threads, d, round_to or None, seeds) for name in nets.split(',')]
    print(f"\n# bench/deploy.py --nets {nets} --epochs {epochs} --ft-epochs {ft_epochs} --qat-epochs {qat_epochs} --round-to {round_to} --seeds {seeds} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print('\n\n'.join(out))
    print(f"total {time.time()-t0:.0f}s")
