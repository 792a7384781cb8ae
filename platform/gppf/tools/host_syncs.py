"""A counter of device-to-host synchronisations that works on the CPU too (tests/test_host_syncs.py,
benchmarks/gpu_check.py). A dispatch mode records the operations which, on a GPU, wait for it:
scalar reads (`.item()`, `bool(t)`, `float(t)`), data-dependent shapes (boolean indexing,
`nonzero`, `masked_select`, `unique`) and copies to the host (`Tensor.cpu`, `Tensor.tolist`;
`numpy()` only ever reads a host tensor). On a GPU, `torch.cuda.set_sync_debug_mode` is the
device's own count."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DATA_DEPENDENT = ("aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique")


class HostSyncs(TorchDispatchMode):
    """Records, in this thread, every operation that waits for the device to reach it."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._patched: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        indices = args[1] if name.startswith("aten.index.Tensor") and len(args) > 1 else ()
        bool_index = any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices)
        if name.startswith("aten._local_scalar_dense") or name.startswith(DATA_DEPENDENT) or bool_index:
            self.events.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in ("cpu", "tolist"):
            original = getattr(torch.Tensor, method)
            self._patched.append((method, original))

            def counted(t, *a, _m=method, _o=original, **k):
                self.events.append(f"Tensor.{_m}")
                return _o(t, *a, **k)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched:
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)
