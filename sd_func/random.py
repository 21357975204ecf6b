"""JAX-style explicit randomness: keys are values, never global state.

A key is a Python int in [0, 2**63). `split` and `fold_in` derive new keys with
the SplitMix64 finaliser, so derived streams are independent of call order and
of batch size or world size. Sampling turns a key into a torch.Generator
(Philox on CUDA is not used: noise is always drawn on the CPU generator and moved,
so the same key gives the same numbers on every device).
"""

import torch

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def key(seed: int) -> int:
    """The root key of an integer seed."""
    return _mix(int(seed) & _MASK64) & _MASK63


def fold_in(k: int, data: int) -> int:
    """A new key that depends on k and on an integer (a step, an example index)."""
    return _mix(_mix(int(k) & _MASK64) ^ _mix((int(data) + 0x5BD1E995) & _MASK64)) & _MASK63


def split(k: int, num: int = 2) -> list[int]:
    """num independent keys derived from k."""
    return [fold_in(fold_in(k, 0x5EED), i) for i in range(num)]


def generator(k: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(k))


def normal(k: int, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator(k), dtype=torch.float32).to(device=device, dtype=dtype)


def uniform(k: int, shape, low=0.0, high=1.0, dtype=torch.float32, device=None) -> torch.Tensor:
    u = torch.rand(tuple(shape), generator=generator(k), dtype=torch.float32)
    return (low + (high - low) * u).to(device=device, dtype=dtype)


def randint(k: int, shape, low: int, high: int, device=None) -> torch.Tensor:
    return torch.randint(low, high, tuple(shape), generator=generator(k)).to(device)


def normal_per_key(keys: list[int], shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """One independent draw of `shape` per key, stacked: [len(keys), *shape].

    Row i depends only on keys[i]: an image's noise never depends on the batch.
    """
    return torch.stack([normal(k, shape) for k in keys]).to(device=device, dtype=dtype)
