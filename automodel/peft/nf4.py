"""QLoRA's frozen base: linear layers whose weight is stored in 4-bit NF4 (bitsandbytes), dequantized per matmul.

`NF4Linear` is an `nn.Linear` until its weight holds values, so the model's own initializer and the
pretrained-weight reader fill it exactly like the plain layer (same names, same values as LoRA's base). The
engine then calls `quantize_()` on it as soon as that one module is filled (materialize's `finish` hook), so
a rank never holds more than one layer's weight in full precision: the base costs ~0.52 bytes per parameter
(4 bits + double-quantized block scales), as in the QLoRA paper.

The quantized state is ordinary tensors (the packed weight stays the parameter `weight`; the block scales
are buffers beside it), so checkpoints save and restore it like any other tensor and a resume is bitwise.
`_load_from_state_dict` accepts that quantized form into a module that was built unquantized (a weightless
skeleton for export), and `dequantized()` gives back the plain `nn.Linear` the export merges adapters into.
The same blocksize, NF4 code and double quantization as transformers' `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`, so an adapter trained here applies to the base
loaded that way (tested).
"""

from __future__ import annotations

import math

import torch
from torch import nn

BLOCKSIZE = 64  # NF4 block (QLoRA's and bitsandbytes' default)
NESTED_BLOCKSIZE = 256  # the block scales' own blocks under double quantization
_NESTED = ("nested_absmax", "nested_quant_map", "offset")


class NF4Linear(nn.Linear):
    double_quant: bool = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool) -> "NF4Linear":
        """The same parameters (on meta, or wherever they are), as an NF4Linear not yet quantized."""
        new = cls.__new__(cls)
        new.__dict__ = dict(linear.__dict__)
        new._parameters = dict(linear._parameters)
        new._buffers = dict(linear._buffers)
        new._modules = dict(linear._modules)
        new.double_quant = double_quant
        return new

    @property
    def quantized(self) -> bool:
        return "weight_absmax" in self._buffers

    def _state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors of the quantized form, with their shapes: known from the layer's size alone."""
        n = self.in_features * self.out_features
        blocks = math.ceil(n / BLOCKSIZE)
        shapes = {"weight": ((math.ceil(n / 2), 1), torch.uint8),
                  "weight_absmax": ((blocks,), torch.uint8 if self.double_quant else torch.float32),
                  "weight_quant_map": ((16,), torch.float32)}
        if self.double_quant:
            shapes.update(weight_nested_absmax=((math.ceil(blocks / NESTED_BLOCKSIZE),), torch.float32),
                          weight_nested_quant_map=((256,), torch.float32), weight_offset=((), torch.float32))
        return shapes

    def _set_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        self._parameters["weight"] = nn.Parameter(tensors.pop("weight"), requires_grad=False)
        for k, v in tensors.items():
            self._buffers[k] = v
        self.__dict__.pop("_quant_state", None)

    def quantize_(self) -> None:
        """Replace the full-precision weight by its NF4 form (on meta: the shapes alone, for templates)."""
        if self.quantized:
            return
        w = self.weight
        if w.is_meta:
            self._set_quantized({k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in self._state_shapes().items()})
            return
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w.detach().float(), blocksize=BLOCKSIZE, compress_statistics=self.double_quant,
                                           quant_type="nf4", quant_storage=torch.uint8)
        tensors = {"weight": packed, "weight_absmax": state.absmax, "weight_quant_map": state.code}
        if self.double_quant:
            tensors.update(weight_nested_absmax=state.state2.absmax, weight_nested_quant_map=state.state2.code,
                           weight_offset=state.offset.reshape(()))
        self._set_quantized(tensors)

    def quant_state(self):
        """bitsandbytes' QuantState over this module's own tensors (rebuilt when they were replaced)."""
        import bitsandbytes.functional as bnbf

        key = tuple(id(self._buffers[k]) for k in self._state_shapes() if k != "weight")
        cached = self.__dict__.get("_quant_state")
        if cached is not None and cached[0] == key:
            return cached[1]
        nested = None
        if self.double_quant:
            nested = bnbf.QuantState(absmax=self.weight_nested_absmax, code=self.weight_nested_quant_map,
                                     blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state = bnbf.QuantState(absmax=self.weight_absmax, shape=torch.Size((self.out_features, self.in_features)),
                                code=self.weight_quant_map, blocksize=BLOCKSIZE, quant_type="nf4", dtype=torch.float32,
                                offset=self.weight_offset if self.double_quant else None, state2=nested)
        self.__dict__["_quant_state"] = (key, state)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return super().forward(x)
        import bitsandbytes as bnb

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.weight.t(), bias=bias, quant_state=self.quant_state()).to(x.dtype)

    def dequantized(self) -> nn.Linear:
        """A plain nn.Linear (fp32) holding the weight this layer computes with."""
        import bitsandbytes.functional as bnbf

        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = bnbf.dequantize_4bit(self.weight.data, self.quant_state()) if self.quantized else self.weight.data
        linear.weight = nn.Parameter(weight.float(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.data.float(), requires_grad=False)
        return linear

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not self.quantized and self.weight.is_meta and prefix + "weight_absmax" in state_dict:
            self.quantize_()  # a weightless skeleton: take on the quantized form the state dict holds
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.__dict__.pop("_quant_state", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4{', double-quantized' if self.double_quant else ''}"


def quantize_bases(model: nn.Module, double_quant: bool) -> int:
    """Swap every LoRA-wrapped base `nn.Linear` (peft's `base_layer`) for an unquantized NF4Linear; the count."""
    swapped = 0
    for module in list(model.modules()):
        base = module._modules.get("base_layer")
        if type(base) is nn.Linear:
            module._modules["base_layer"] = NF4Linear.from_linear(base, double_quant)
            swapped += 1
    return swapped


def dequantize_bases(model: nn.Module) -> None:
    """Every NF4Linear back to the plain nn.Linear it computes as (for merging adapters and export)."""
    for module in list(model.modules()):
        base = module._modules.get("base_layer")
        if isinstance(base, NF4Linear):
            module._modules["base_layer"] = base.dequantized()
