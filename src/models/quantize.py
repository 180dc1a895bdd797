"""Weight-only quantisation for fast CPU decoding: QUANTIZE=int8 or int4.

Generating one token reads every weight of the model once, and on a small CPU that reading
is the bottleneck: the matrix multiplications of SmolLM2-135M move 540 MB per token in fp32
and 270 MB in bf16, at roughly 10 GB/s of memory bandwidth. Storing the weights in 8 or 4
bits moves two or four times fewer bytes, and PyTorch ships CPU kernels that multiply bf16
activations by packed low-bit weights directly, without materialising the bf16 matrix:

- int8: one scale per output row (``aten._weight_int8pack_mm``);
- int4: one scale and one offset per group of 32 input weights, asymmetric
  (``aten._weight_int4pack_mm_for_cpu``), the same scheme as llama.cpp's Q4_1. A GGUF file's
  Q4_0, Q4_1 and Q4_K matrices keep their codes (``src/models/gguf_import.py``; the bundled
  SmolLM2 is a Q4_1 file), up to rounding of the scales to bf16. Other weights are rounded
  with each group's scale and minimum refitted by least squares (``fit_int4_groups``: 13%
  less squared error than plain min/max rounding on heavy-tailed weights, for 3.6 times its
  time), which is still lossy; the benchmark's perplexity column measures it.

With several rows (a batched decoding step, a prompt) the int4 product is limited by
arithmetic rather than memory, and PyTorch's kernel is slow there: our own C kernel
(INT4_KERNEL=auto, ``src/models/int4_kernel.py``) replaces it where the CPU has AVX-512 BF16
or AVX2, with the same numbers up to fp32 rounding (the AVX2 one also rounds activations far
below their group's largest to 16-bit integers: below bf16's own rounding of the result), and
a row's result never depends on the rows beside it.

Only the activations that enter these kernels are bf16; the layer returns the dtype it was
given, so the rest of the model keeps PRECISION. The output layer is the exception: it is
int8 in both modes and, given several rows (a batched decoding step, a whole sequence), also
rounds its inputs to int8, one scale per row (``Int8DynamicLinear``), which makes a batch of
rows several times cheaper. This is weight-only quantisation for
inference: training uses ordinary weights, and LoRA adapters run beside the quantised layers
in the model's precision (src/models/lora_view.py; on transformers' engine they are merged
in before quantising).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from src.models.cpu_info import cpu_flags
from src.models.single_steps import in_single_steps

if TYPE_CHECKING:
    from src.models.int4_kernel import Int4Kernel
    from src.models.int8_kernel import Int8Kernel
    from src.models.native import Bf16Matmul

logger = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "int4"]
INT4_GROUP_SIZE = 32  # weights per (scale, offset) pair; Q4_1 uses blocks of 32 too
INT8_ACTIVATION_MIN_ROWS = 4  # from the kernel timings in Int8DynamicLinear
OUTPUT_LAYER_NAME = "lm_head"  # in transformers models and in ours


def symmetric_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row as int8 codes and one float32 scale, (M, K) and (M, 1): the largest |x| of a
    row maps to 127, so codes * scale gives the row back up to rounding."""
    rows = rows.float()
    scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(rows / scale).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """Common shape of the two layers: ``from_linear`` quantises an nn.Linear; the plain
    constructor makes an empty layer of the right shapes for loading saved buffers into."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        layer.quantize(linear.weight.detach().float())
        return layer

    def quantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel_operands(self) -> tuple[Bf16Matmul, torch.Tensor, torch.Tensor] | None:
        """Our C kernel and the two buffers it reads, where this layer multiplies through it
        (and has no bias); None where PyTorch's kernel does the work."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Conversions only where the dtypes differ: a no-op .to() still costs a dispatch, and
        # a decoding step runs this four times per layer.
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.bfloat16:
            flat = flat.to(torch.bfloat16)  # the kernels' input dtype
        y = self.matmul(flat)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Linear(QuantizedLinear):
    """y = x W^T + b with W stored as int8 and one bf16 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer(
            "weight_int8", torch.empty(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))

    def quantize(self, weight: torch.Tensor) -> None:
        self.weight_int8, scales = symmetric_int8(weight)
        self.scales = scales.squeeze(1).to(torch.bfloat16)

    # Our C kernel (src/models/int8_kernel.py), set by use_int8_kernel; None: PyTorch's.
    kernel: Int8Kernel | None = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_our_kernel():
            return self.kernel(x, self.weight_int8, self.scales, self.out_features)
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)

    def uses_our_kernel(self) -> bool:
        return self.kernel is not None and self.scales.dtype == torch.bfloat16

    def kernel_operands(self) -> tuple[Int8Kernel, torch.Tensor, torch.Tensor] | None:
        if not self.uses_our_kernel() or self.bias is not None:
            return None
        return self.kernel, self.weight_int8, self.scales


@functools.cache
def int8_dot_products() -> bool:
    """Whether the CPU multiplies int8 by int8 in hardware (VNNI: AVX-512's or AVX's, or
    AMX), which makes ``torch._int_mm`` fast."""
    flags = set(cpu_flags() or [])
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


class Int8DynamicLinear(Int8Linear):
    """The int8 layer that, given several rows, quantises them too: one scale per row (the
    largest |x| maps to 127), so each row's result depends only on that row.

    The product of int8 by int8 then runs on the CPU's integer dot-product instructions
    (``aten._int_mm``; AVX-512 VNNI here) and sums exactly in int32. llama.cpp multiplies the
    same way (it quantises activations to 8 bits for its dot products). For SmolLM2's output
    projection (576 x 49,152) with 8 rows, as in a batched decoding step, this takes 2.1 ms
    against 5.7 ms for the bf16-by-int8 kernel and 4.4 ms for a dense bf16 matrix.

    Only where the CPU has such instructions (VNNI, ``int8_dot_products``): without them,
    PyTorch's int8-by-int8 product is several times slower than the bf16-by-int8 kernel (16
    rows: 246 against 33 ms on a Zen 1 EPYC), so the layer keeps exact bf16 activations there.

    Below ``INT8_ACTIVATION_MIN_ROWS`` rows (one stream decoding) the kernel is no faster, and
    the bf16 activations stay exact: rounding them moves SmolLM2's logits by about 0.2, which
    changes the greedy choice where two tokens are that close (the first token of the
    benchmark's prompt). Over whole sequences the held-out perplexity moves by 0.03-0.2%.

    Used for the output layer only: quantising the inputs of the other layers this way costs
    SmolLM2 5% perplexity (their activations have outlier channels that one scale per row
    flattens)."""

    def kernel_operands(self) -> None:
        # Its product depends on the number of rows (int8 activations from a few on): only
        # its own matmul may decide, so no other call takes its kernel.
        return None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        few_rows = x.shape[0] < INT8_ACTIVATION_MIN_ROWS or in_single_steps()
        if few_rows or not int8_dot_products():
            return super().matmul(x)
        return self.int8_product(x)

    def int8_product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T with x rounded to int8, one scale per row: (M, N) float32."""
        codes, scale = symmetric_int8(x)
        products = torch._int_mm(codes, self.weight_int8.t())  # (M, N), int32, exact
        return products * (scale * self.scales.float())


class Int4Linear(QuantizedLinear):
    """y = x W^T + b with W stored as 4-bit codes q, w = (q - 8) * scale + offset per group of
    32 input weights (the scale and offset of a group map its min and max to codes 0 and 15)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = INT4_GROUP_SIZE
        # Two codes per byte; (K/g, N, 2): per group and output row, the scale then the offset.
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        scales = torch.empty(in_features // self.group_size, out_features, 2, dtype=torch.bfloat16)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_offsets", scales)

    def quantize(self, weight: torch.Tensor) -> None:
        groups = weight.reshape(self.out_features, -1, self.group_size)  # (N, K/g, g)
        codes, scale, low = fit_int4_groups(groups)
        self.store_groups(codes.reshape(self.out_features, self.in_features), scale, low)

    def store_groups(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        """Weights given as codes (N, K) in 0..15 and, per group, (N, K/g) scale and low:
        w = code * scale + low (how GGUF's Q4_0, Q4_1 and Q4_K store them, too)."""
        # The kernel subtracts 8 from each code: the offset is the weight that code 8 means.
        offset = low.float() + 8 * scale.float()
        codes = codes.to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales_and_offsets = torch.stack([scale.float(), offset], dim=-1).transpose(0, 1)
        self.scales_and_offsets = scales_and_offsets.contiguous().bfloat16()

    # Our C kernel (src/models/int4_kernel.py), set by use_int4_kernel; None: PyTorch's.
    kernel: Int4Kernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == torch.bfloat16 and self.bias is None:
            # Our kernel takes any leading shape: no reshape and view around it (each a
            # dispatch, four layers per decoding step).
            return self.matmul(x)
        return super().forward(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.packed, self.scales_and_offsets, self.out_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_offsets
        )

    def kernel_operands(self) -> tuple[Int4Kernel, torch.Tensor, torch.Tensor] | None:
        if self.kernel is None or self.bias is not None:
            return None
        return self.kernel, self.packed, self.scales_and_offsets


def int4_packing() -> str:
    """The layout ``aten._convert_weight_to_int4pack_for_cpu`` writes on this machine, named
    by the instruction set PyTorch dispatches to (``avx512``, ``avx2``, ``default``...)."""
    return torch.backends.cpu.get_cpu_capability().lower()


INT4_REFITS = 4  # least-squares refits of a group's scale and minimum to its codes


def fit_int4_groups(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (..., g) in 0..15 and per-group scale and low (...,) for weights = codes * scale
    + low, with less squared error than plain rounding: start from each group's min and max,
    then refit scale and low to the codes by least squares and round again (as llama.cpp's
    K-quant search does), keeping a refit only for the groups whose error it lowers. So no
    group is worse than min/max rounding, and weights already on a 4-bit grid come back
    exactly."""
    groups = groups.float()
    best = _round_to_grid(groups, groups.amin(dim=-1), groups.amax(dim=-1))
    for _ in range(INT4_REFITS):
        scale, low = _least_squares(groups, best[0])
        best = _better(best, _round_to_grid(groups, low, low + 15 * scale))
    codes, scale, low, _ = best
    return codes, scale, low


def _round_to_grid(groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple:
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    error = (codes * scale[..., None] + low[..., None] - groups).square().sum(dim=-1)
    return codes, scale, low, error


def _better(current: tuple, candidate: tuple) -> tuple:
    """Per group, whichever of two (codes, scale, low, error) has the smaller error."""
    take = candidate[3] < current[3]
    return tuple(
        torch.where(take[..., None] if old.dim() > take.dim() else take, new, old)
        for old, new in zip(current, candidate, strict=True)
    )


def _least_squares(groups: torch.Tensor, codes: torch.Tensor) -> tuple:
    """Per group, the scale and low that fit weights = codes * scale + low best."""
    count = groups.shape[-1]
    sum_q, sum_w = codes.sum(-1), groups.sum(-1)
    sum_qq, sum_qw = codes.square().sum(-1), (codes * groups).sum(-1)
    denominator = count * sum_qq - sum_q.square()
    flat = denominator <= 0  # every code the same: keep the mean, any positive scale
    scale = torch.where(flat, 1e-12, (count * sum_qw - sum_q * sum_w) / denominator.clamp(min=1))
    scale = scale.clamp(min=1e-12)
    low = (sum_w - scale * sum_q) / count
    return scale, low


def use_int4_kernel(model: nn.Module, setting: str, cache_dir: Path) -> bool:
    """INT4_KERNEL: "auto" gives every int4 layer our C kernel where it can run here (see
    src/models/int4_kernel.py), "pytorch" PyTorch's. True if ours is in use."""
    from src.models import int4_kernel

    return _use_kernel(model, Int4Linear, setting, cache_dir, int4_kernel.load_int4_kernel,
                       int4_kernel.can_run)  # fmt: skip


def use_int8_kernel(model: nn.Module, setting: str, cache_dir: Path) -> bool:
    """INT8_KERNEL: "auto" gives every int8 layer (the output layer included) our C kernel
    where it can run here (see src/models/int8_kernel.py), "pytorch" PyTorch's. True if ours
    is in use."""
    from src.models import int8_kernel

    return _use_kernel(model, Int8Linear, setting, cache_dir, int8_kernel.load_int8_kernel,
                       int8_kernel.can_run)  # fmt: skip


def _use_kernel(
    model: nn.Module,
    layer_class: type[QuantizedLinear],
    setting: str,
    cache_dir: Path,
    load: Callable[[Path], object | None],
    can_run: Callable[[int, int], bool],
) -> bool:
    """The kernel ``load`` gives (on "auto") on each ``layer_class`` layer of ``model`` whose
    shape it takes; PyTorch's on the others. True if ours is in use."""
    layers = [layer for layer in model.modules() if isinstance(layer, layer_class)]
    kernel = load(Path(cache_dir)) if setting == "auto" and layers else None
    for layer in layers:
        layer.kernel = kernel if can_run(layer.out_features, layer.in_features) else None
    return kernel is not None


LAYER_CLASSES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


def resolve_quantization(setting: str, folder: Path) -> Quantization:
    """QUANTIZE's method; "auto" follows a model converted from a GGUF file, the bundled one
    included (int4 where its matrices were 4-bit: int4 keeps their codes; int8 where they were
    5 to 8 bits; see src/models/gguf_import.py), and is none for any other model (quantising
    it would change its outputs)."""
    if setting == "auto":
        from src.models.gguf_import import file_quantization

        return file_quantization(folder) or "none"  # type: ignore[return-value]
    return setting  # type: ignore[return-value]


def quantize_for_inference(model: nn.Module, method: Quantization) -> nn.Module:
    """``quantize_model`` for a model about to serve chat: a LoRA adapter (a peft model) is
    merged into the base weights first, so the quantised layers already include it."""
    if method == "none":
        return model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return quantize_model(model, method)


def can_quantize(linear: nn.Linear, method: Quantization) -> bool:
    if method == "int4":  # the kernel's packing works on whole groups and 16-row tiles
        return linear.in_features % INT4_GROUP_SIZE == 0 and linear.out_features % 16 == 0
    return True


def quantize_model(model: nn.Module, method: Quantization, empty: bool = False) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place) by its ``method`` version; layers the
    kernel cannot take (int4 needs an input width that is a multiple of 32 and an output width
    that is a multiple of 16; GPT-2's Conv1D is not an nn.Linear) keep their weights.
    ``empty=True`` makes the quantised layers without computing them (to load saved ones).
    Returns ``model``. Only runs on CPU."""
    if method == "none":
        return model
    if method not in ("int8", "int4"):
        raise ValueError(f"QUANTIZE={method!r}; allowed: none, int8, int4")
    # (The meta device builds an empty quantised skeleton for src/models/prepared.py.)
    if any(p.device.type not in ("cpu", "meta") for p in model.parameters()):
        raise ValueError(f"QUANTIZE={method} uses PyTorch's CPU kernels; the model is not on CPU")
    replaced, kept = 0, 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            # The output projection (vocabulary logits) is the most sensitive layer: int4
            # there costs SmolLM2 2.3% perplexity, int8 0.6%. llama.cpp's Q4 files likewise
            # keep it at higher precision.
            output = name == OUTPUT_LAYER_NAME
            layer_method = "int8" if output else method
            if can_quantize(child, layer_method):
                layer_class = LAYER_CLASSES[layer_method]
                if output:  # int8 activations too: fast with several rows, see the class
                    layer_class = Int8DynamicLinear
                if empty:
                    layer = layer_class(
                        child.in_features, child.out_features, child.bias is not None
                    )
                else:
                    layer = layer_class.from_linear(child)
                setattr(parent, name, layer)
                replaced += 1
            else:
                kept += 1
    if replaced == 0:
        logger.warning("Notice: QUANTIZE=%s found no nn.Linear layer it could quantise.", method)
    logger.debug("QUANTIZE=%s: %d linear layers quantised, %d kept", method, replaced, kept)
    return model
