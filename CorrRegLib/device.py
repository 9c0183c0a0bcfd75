"""Pick the compute device: CUDA if present, then Apple MPS, then CPU."""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``mps`` (or a torch.device) to an available device.

    Asking explicitly for a device that is not available raises a ValueError that says so,
    instead of failing later inside a kernel.
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but this PyTorch build sees no CUDA GPU; use --device cpu or auto")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' was asked for but Apple MPS is not available here; use --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def set_threads(n: int | None) -> int:
    """Use ``n`` torch CPU threads (``torch.set_num_threads``); None keeps torch's default
    (the number of physical cores, or ``OMP_NUM_THREADS``). Returns the count in use.

    On a CPU shared with other jobs, one thread is often much faster than an oversubscribed
    default (OpenMP threads wait on each other): ``Testing/Benchmarks/bench_threads.py`` measures it.
    """
    if n is None:
        return torch.get_num_threads()
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"the number of threads must be a whole number of at least 1, got {n}")
    torch.set_num_threads(int(n))
    return torch.get_num_threads()
