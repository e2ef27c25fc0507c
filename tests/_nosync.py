"""A tripwire for host synchronisation on the CPU: inside ``NoHostSync()`` every ATen op that reads a
tensor's value back to the host, or whose output shape depends on tensor values, raises. Those are what
keep a step from being captured as a CUDA graph (``torch.cuda.set_sync_debug_mode`` sees the same only
on a GPU): ``.item()``, ``float(t)``, ``bool(t)`` and a Python ``if`` on a tensor
(``_local_scalar_dense``), boolean-mask indexing, ``nonzero``, ``masked_select``, ``bincount``,
``unique`` and ``.tolist()``."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
           "aten::bincount", "aten::unique_dim", "aten::_unique2", "aten::unique_consecutive",
           "aten::repeat_interleave", "aten::histc"}
BOOL_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class HostSyncError(AssertionError):
    pass


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING or (name in BOOL_INDEXED and _bool_index(args)):
            raise HostSyncError(f"{name} synchronises with the host")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t):
            raise HostSyncError(".tolist() synchronises with the host")

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
