"""CPU adaptations of torchtitan 0.3.0 on torch 2.13.0, in one place.

torchtitan assumes an accelerator. On a machine without CUDA, :func:`apply` patches the few
spots that break, all of them *module attributes* (nothing is copied or forked), and the
trainer switches a handful of config values (:func:`adapt_config`). On CUDA :func:`apply` is a
no-op and configs run unchanged.

The known problems (letters as in the trainer issue):

(a) ``tools/utils.py`` defaults the device type to ``cuda``      -> device type ``cpu``
(b) ``components/metrics.py`` calls memory/device-name APIs that ``torch.cpu`` lacks
                                                                  -> :class:`CpuDeviceModule`
(c) ``models/common/token_dispatcher.py`` imports ``triton`` through
    ``distributed/minimal_async_ep/kernels.py``                   -> stub kernels module
(d) ``distributed/utils.set_pg_timeouts`` calls ``barrier(device_ids=[...])`` and
    ``torch.distributed.set_timeout`` (absent in 2.13.0)          -> plain barrier, no-op
(e) flex attention has no CPU backward                            -> SDPA (configs choose it)
(f) FSDP needs ``spmd_backend="partial_dtensor"``                 -> :func:`adapt_config`
(g) Gloo rejects ``ReduceOp.PREMUL_SUM`` from the divide factor 1.0
                                                                  -> force SUM reductions
(h) EP requires ``training.disable_cuda_graphs``                  -> :func:`adapt_config`
(i) DTensor random init on CPU fills every rank's shard identically (experts become copies)
                                                                  -> ``moe_cpt.trainer.init_guard``
(j) ``models/common/moe.py`` ``GroupedExperts.forward`` casts tokens and expert weights to bf16
    for its grouped-matmul seam ``GroupedExperts._grouped_mm`` (-> ``torch._grouped_mm``); CPU
    bf16 matmuls run ~40x slower than fp32 and differ from the dense FFN's fp32 numerics
                                                                  -> fp32 experts
    (:func:`install_fp32_experts`: the seam upcasts to fp32 and returns the caller's dtype;
    ``forward`` runs under a torch-function mode that makes its ``.bfloat16()`` casts of fp32
    tensors no-ops, so the seam gets the fp32 tensors themselves; both are wrappers of
    torchtitan's own functions, kept as ``__wrapped__``; :func:`stock_grouped_experts` puts
    torchtitan's back for a ``with`` block, e.g. to benchmark its bf16 path)
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class _CpuProperties:
    total_memory: int
    name: str = "cpu"


class CpuDeviceModule:
    """``torch.cpu`` plus the memory/device calls torchtitan's metrics make (b)."""

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch.cpu, name)

    def get_device_name(self, device: Any = None) -> str:
        return "cpu"

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def set_device(self, device: Any) -> None:
        return None

    def get_device_properties(self, device: Any = None) -> _CpuProperties:
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            mem = 1 << 30
        return _CpuProperties(total_memory=int(mem))

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        return {}

    def synchronize(self, device: Any = None) -> None:
        return None


def stub_triton_kernels_if_missing() -> None:
    """(c): torchtitan's token dispatcher imports the minimal-async-EP triton kernels at import
    time. Without triton they cannot load (and are never used); register a stub module whose
    kernels raise if called. Cheap (no torch import): run from ``trainer/__init__.py``."""
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(name)

    def _unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("minimal_async_ep kernels need triton/CUDA")

    for kernel in (
        "copy_full_counts_to_peers_kernel",
        "copy_rows_to_peers_kernel",
        "expand_topk_grad_kernel",
        "fill_combine_metadata_kernel",
        "fill_dispatch_metadata_kernel",
        "invert_flat_indices_kernel",
        "reduce_topk_slots_kernel",
        "topk_scores_grad_kernel",
    ):
        setattr(stub, kernel, _unavailable)
    sys.modules[name] = stub


def _set_pg_timeouts_cpu(timeout: Any, parallel_dims: Any) -> None:
    """(d): the stock version passes ``device_ids`` to a gloo barrier and calls
    ``torch.distributed.set_timeout``; on CPU a plain barrier is all that is needed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def keep_float32_mode_class() -> type:
    """(j): a ``TorchFunctionMode`` under which ``t.bfloat16()`` on a float32 tensor returns
    ``t`` itself (same values, same autograd node); every other call runs unchanged. Built on
    demand so that importing this module does not import torch."""
    import torch
    from torch.overrides import TorchFunctionMode

    class KeepFloat32(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            if (func is torch.Tensor.bfloat16 and not kwargs and len(args) == 1
                    and args[0].dtype == torch.float32):
                return args[0]
            return func(*args, **kwargs)

    return KeepFloat32


def fp32_grouped_mm(original: Callable[..., Any]) -> Callable[..., Any]:
    """(j): ``GroupedExperts._grouped_mm`` computing in float32: operands upcast to fp32 (a
    no-op for the fp32 tensors :func:`fp32_experts_forward` passes), torchtitan's own seam
    (``torch._grouped_mm``) on them, the result in ``A``'s dtype (what the caller expects)."""

    @functools.wraps(original)
    def _grouped_mm(self: Any, *, A: Any, B_t: Any, offs: Any) -> Any:
        import torch

        out = original(self, A=A.to(torch.float32), B_t=B_t.to(torch.float32), offs=offs)
        return out.to(A.dtype)

    _grouped_mm.cpu_fp32 = True  # type: ignore[attr-defined]
    return _grouped_mm


def fp32_experts_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """(j): ``GroupedExperts.forward`` run under :func:`keep_float32_mode_class`'s mode: its
    bf16 casts of fp32 tokens/weights become no-ops, so its matmuls (and SiLU/product) stay in
    fp32."""
    keep_float32 = keep_float32_mode_class()

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        with keep_float32():
            return original(self, *args, **kwargs)

    forward.cpu_fp32 = True  # type: ignore[attr-defined]
    return forward


def install_fp32_experts() -> bool:
    """(j): install the fp32 wrappers on torchtitan's ``GroupedExperts`` (class attributes
    ``forward`` and ``_grouped_mm`` of ``torchtitan.models.common.moe``). Idempotent; called by
    :func:`apply` (so never with CUDA). Returns True when it installed them now."""
    from torchtitan.models.common.moe import GroupedExperts

    if getattr(GroupedExperts.forward, "cpu_fp32", False):
        return False
    GroupedExperts._grouped_mm = fp32_grouped_mm(GroupedExperts._grouped_mm)
    GroupedExperts.forward = fp32_experts_forward(GroupedExperts.forward)
    return True


def fp32_experts_installed() -> bool:
    from torchtitan.models.common.moe import GroupedExperts

    return bool(getattr(GroupedExperts.forward, "cpu_fp32", False))


@contextmanager
def stock_grouped_experts() -> Iterator[None]:
    """(j): torchtitan's own ``GroupedExperts.forward``/``_grouped_mm`` (its bf16 path) inside
    the block, the fp32 wrappers again after it (a no-op when they are not installed)."""
    from torchtitan.models.common.moe import GroupedExperts

    if not fp32_experts_installed():
        yield
        return
    fp32_forward, fp32_mm = GroupedExperts.forward, GroupedExperts._grouped_mm
    GroupedExperts.forward = fp32_forward.__wrapped__
    GroupedExperts._grouped_mm = fp32_mm.__wrapped__
    try:
        yield
    finally:
        GroupedExperts.forward, GroupedExperts._grouped_mm = fp32_forward, fp32_mm


def applied() -> bool:
    """Whether :func:`apply` patched torchtitan in this process (read off torchtitan's own
    ``device_module``, so there is no flag of ours to keep in step)."""
    tools = sys.modules.get("torchtitan.tools.utils")
    return tools is not None and isinstance(getattr(tools, "device_module", None), CpuDeviceModule)


def apply() -> bool:
    """Patch torchtitan for CPU when no CUDA device is present. Idempotent.
    Returns True when the CPU adaptations are active."""
    if cuda_present():
        return False
    if applied():
        return True
    stub_triton_kernels_if_missing()
    import torchtitan.tools.utils as tt_utils

    cpu_module = CpuDeviceModule()
    tt_utils.device_type = "cpu"  # (a)
    tt_utils.device_module = cpu_module
    import torchtitan.components.metrics as tt_metrics
    import torchtitan.distributed.parallel_dims as tt_parallel_dims
    import torchtitan.distributed.utils as tt_dist_utils
    import torchtitan.models.common.token_dispatcher as tt_dispatcher
    import torchtitan.tools.profiler as tt_profiler

    for module in (tt_metrics, tt_dist_utils, tt_dispatcher, tt_parallel_dims, tt_profiler):
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = cpu_module  # (b)
    tt_metrics.DeviceMemoryMonitor.__init__.__defaults__ = ("cpu:0",)
    tt_dist_utils.set_pg_timeouts = _set_pg_timeouts_cpu  # (d)
    install_fp32_experts()  # (j)
    return True


def adapt_config(training: Any, parallelism: Any) -> None:
    """(f), (h): CPU values of a ``TrainingConfig``/``ParallelismConfig`` (set before the
    ``Trainer.Config`` is built, whose validation needs them); no-op with CUDA."""
    if cuda_present():
        return
    parallelism.spmd_backend = "partial_dtensor"  # (f)
    training.disable_cuda_graphs = True  # (h)


def force_sum_reductions(model: Any) -> None:
    """(g): with a gradient divide factor of 1.0 FSDP would reduce with PREMUL_SUM, which gloo
    rejects; plain SUM gives the same result."""
    if cuda_present():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
