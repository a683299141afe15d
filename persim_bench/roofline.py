"""The machine's limit for a piece of torch code: a roofline summed over the aten ops it runs.

Each op (forward, backward and optimizer alike, as the dispatcher sees them) takes at least the
longer of its multiply-adds at the machine's dense matmul rate and its bytes (every tensor it
reads plus every tensor it writes) at the machine's fastest read bandwidth (a buffer within L2);
the code's limit is the sum over its ops. Code whose intermediates stay in cache between ops can
reach it; code that fuses ops (torch.compile) moves fewer bytes than the sum and may pass it. Every
rate is measured on this machine (``machine_rates``), so "0.3 of the limit" means the same here as
on any other machine. Small models are memory-bound: at MountainCar sizes a layer's [5, 256, 256]
activation is read and written several times per step for a few multiply-adds per element.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry


@dataclass(frozen=True)
class Rates:
    macs_per_second: float  # dense float32 matmul, multiply-adds
    # (bytes, bytes read per second) of buffers of growing size: from within L2 to far beyond every cache
    read_rates: tuple[tuple[int, float], ...]

    def bandwidth(self, size: float) -> float:
        """The bandwidth an op of ``size`` bytes is costed at: the fastest measured (its tensors in L2), since
        consecutive ops on a cache-sized chunk find their inputs there; the rates at larger sizes show how
        far the memory falls behind for code that does not chunk."""
        return max(rate for _, rate in self.read_rates)

    def op_seconds(self, macs: float, size: float) -> float:
        """The roofline of one op: the slower of its arithmetic and its memory traffic."""
        return max(macs / self.macs_per_second, size / self.bandwidth(size))

    def memory_bound(self, macs: float, size: float) -> bool:
        return self.op_seconds(macs, size) > macs / self.macs_per_second


class _CountOps(TorchDispatchMode):
    """Multiply-adds (torch's flop formulas) and bytes of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.per_op: list[tuple[float, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        macs = flop_registry[packet](*args, **kwargs, out_val=out) / 2 if packet in flop_registry else 0.0
        # Each tensor once: an out= or in-place op's result is also among its arguments (counting it once is
        # the optimistic side: its write then comes free with its read).
        tensors = {id(t): t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
        self.per_op.append((macs, float(sum(t.numel() * t.element_size() for t in tensors.values()))))
        return out


def count_work(fn: Callable[[], object]) -> list[tuple[float, float]]:
    """(multiply-adds, bytes) of every aten op ``fn()`` runs."""
    with _CountOps() as counter:
        fn()
    return counter.per_op


def limit_seconds(per_op: list[tuple[float, float]], rates: Rates) -> float:
    """The roofline: each op at the slower of its compute and its memory traffic, summed."""
    return sum(rates.op_seconds(macs, size) for macs, size in per_op)


def l2_cache_bytes(default: int = 1 << 20) -> int:
    """This core's L2 cache size (Linux sysfs), else 1 MiB."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                return int(size.rstrip("KM")) << (20 if size.endswith("M") else 10)
        except (OSError, ValueError):
            continue
    return default


def best_seconds(fn: Callable[[], object], repeats: int = 5, min_seconds: float = 0.2) -> float:
    """Best time per call of ``fn`` over ``repeats`` rounds, each of enough calls to last ``min_seconds``."""
    fn()
    calls, started = 1, time.perf_counter()
    fn()
    once = max(time.perf_counter() - started, 1e-6)
    calls = max(1, int(min_seconds / once))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def machine_rates(threads: int) -> Rates:
    """Dense matmul multiply-adds/s and copy bandwidth with ``threads`` torch threads, measured now."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(5, 512, 512), torch.randn(5, 512, 512)
        out = torch.empty(5, 512, 512)
        matmul = best_seconds(lambda: torch.bmm(a, b, out=out))
        # Reading is the fastest a core moves bytes (a write also reads its cache line first): an optimistic
        # bandwidth keeps the roofline a bound no code beats. Buffers from half of L2 to 128 MiB, finely around
        # L2's size, where the rate falls several-fold (an op is costed at the largest buffer not above its bytes).
        total, read_rates, l2 = torch.empty(()), [], l2_cache_bytes()
        for size in (l2 // 2, 3 * l2 // 4, l2, 5 * l2 // 4, 3 * l2 // 2, 2 * l2, 4 * l2, 16 * l2, 128 << 20):
            buffer = torch.randn(size // 4)
            read_rates.append((size, size / best_seconds(lambda: torch.sum(buffer, 0, out=total), repeats=3)))
    finally:
        torch.set_num_threads(previous)
    return Rates(5 * 512 ** 3 / matmul, tuple(read_rates))
