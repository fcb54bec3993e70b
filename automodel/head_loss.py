"""The loss computed inside the output head, so a `[tokens, vocab]` logits tensor never exists.

Why inside the head: the head's weight is only whole while the head module runs (FSDP2 gathers it in the head's
pre-forward hook and again in its pre-backward hook). So the head of the model is swapped, before the layout,
for `LossHead`: the same `nn.Linear` (same parameter objects, so names, ties, initialization, checkpoints and
export are untouched) whose forward takes the decoder's last hidden states and returns the token-sum
cross-entropy as a 0-d tensor, which the model's forward hands back as `.logits`. The labels reach it through
`LossHead.targets(labels)` around the forward.

A model whose forward changes the head's output (Gemma's logit soft-capping, Cohere's logit scale) would turn
that loss into something else silently; `LossHead.loss_of` refuses such a model on its first step: the model
must hand back the very tensor the head returned.

The loss itself is `linear_cross_entropy`: the head and the cross-entropy chunk by chunk over the tokens, each
chunk's logits `[chunk, vocab]` in fp32 and freed before the next. Its gradients come one of two ways:
- `recompute=False`: computed in the forward pass, chunk by chunk, and kept (`d hidden` [tokens, hidden] and
  `d weight` [vocab, hidden] fp32) until backward scales them: no extra FLOPs;
- `recompute=True`: backward recomputes each chunk's logits (one more head forward, +1/3 of the head's FLOPs)
  and nothing but the hidden states is kept between forward and backward.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from automodel.batch import IGNORE_INDEX
from automodel.errors import UserError
from automodel.modules import hf_base, parent_of

CHUNK_ELEMENTS = 1 << 26  # a chunk's fp32 logits: 256 MiB (e.g. 523 tokens at vocab 128,256)


def chunk_tokens(vocab: int, requested: int | None) -> int:
    """Tokens per chunk: `requested`, or as many as keep a chunk's fp32 logits near CHUNK_ELEMENTS."""
    if requested:
        return requested
    return max(64, (CHUNK_ELEMENTS // max(vocab, 1)) // 64 * 64)


def _compute_dtype(device_type: str, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: what autocast would pick for it, else the weight's."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


@dataclasses.dataclass
class TeacherChunks:
    """What the head needs to distill as it goes: the frozen teacher's last hidden states (the same tokens as the
    student's), its whole head weight and bias, and the blend (automodel/distill.py defines the KL term)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    kd_ratio: float
    temperature: float

    def rows(self, start: int, n: int, dtype) -> torch.Tensor:
        h = self.hidden.reshape(-1, self.hidden.shape[-1])
        return h[start:start + n].to(dtype)


def _distill_chunk(h, y, w, b, teacher: TeacherChunks, start: int, want_grad: bool):
    """One chunk of (1 - r) CE + r T^2 KL(teacher || student): the two token sums, and the blend's gradient
    w.r.t. the chunk's student logits when `want_grad`. The teacher's logits of the chunk exist only here."""
    dtype = w.dtype
    r, temp = teacher.kd_ratio, teacher.temperature
    z = F.linear(h, w, b).float()
    zt = F.linear(teacher.rows(start, h.shape[0], dtype), teacher.weight.to(dtype),
                  teacher.bias.to(dtype) if teacher.bias is not None else None).float()
    valid = (y != IGNORE_INDEX).float()
    target = y.clamp(min=0).unsqueeze(1)
    log_p = torch.log_softmax(z, dim=-1)
    ce = -(log_p.gather(1, target).squeeze(1) * valid).sum()
    log_pt = torch.log_softmax(zt.div_(temp), dim=-1)
    del zt
    log_ps = torch.log_softmax(z.div_(temp), dim=-1)
    del z
    pt = log_pt.exp()
    kl = log_pt.sub_(log_ps).mul_(pt).sum(-1)  # in place: log_pt is not needed after this
    del log_pt
    kd = (kl * valid).sum() * (temp * temp)
    if not want_grad:
        return ce, kd, None
    # d/dz [(1 - r) CE + r T^2 KL] = (1 - r)(softmax(z) - onehot) + r T (softmax(z / T) - teacher's)
    g = log_p.exp_().mul_(1 - r)
    g.scatter_add_(1, target, torch.full_like(target, -(1 - r), dtype=g.dtype))
    g.add_(log_ps.exp_().sub_(pt), alpha=r * temp)
    g.mul_(valid.unsqueeze(1))
    return ce, kd, g.to(dtype)


def _chunk(h, y, w, b, want_grad: bool):
    """Token-sum CE of one chunk, and (softmax - one-hot) over its real targets when `want_grad`
    (in the matmul dtype, ready for the two gradient matmuls)."""
    z = F.linear(h, w, b).float()  # [chunk, vocab]: the one chunk-sized tensor (the softmax is taken in place)
    valid = y != IGNORE_INDEX
    target = y.clamp(min=0).unsqueeze(1)
    picked = z.gather(1, target).squeeze(1)
    top = z.amax(dim=-1, keepdim=True)
    z.sub_(top).exp_()
    total = z.sum(dim=-1, keepdim=True)
    lse = (top + total.log()).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    if not want_grad:
        return loss, None
    z.div_(total)  # softmax
    z.scatter_add_(1, target, torch.full_like(target, -1, dtype=z.dtype))
    z.mul_(valid.unsqueeze(1))
    return loss, z.to(w.dtype)


def _chunks(h, y, w, b, chunk: int, teacher, grads):
    """The token sums (loss, CE, KD) over every chunk; each chunk's gradients go into `grads` (or nowhere)."""
    sums = torch.zeros(3, dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk):
        hc, yc = h[start:start + chunk].to(w.dtype), y[start:start + chunk]
        if teacher is None:
            ce, p = _chunk(hc, yc, w, b, want_grad=grads is not None)
            sums += torch.stack([ce, ce, torch.zeros_like(ce)])
        else:
            ce, kd, p = _distill_chunk(hc, yc, w, b, teacher, start, want_grad=grads is not None)
            sums += torch.stack([(1 - teacher.kd_ratio) * ce + teacher.kd_ratio * kd, ce, kd])
        if grads is not None:
            grads.add(start, hc, p, w)
        del p  # before the next chunk's logits exist
    return sums


class _LinearCrossEntropy(torch.autograd.Function):
    """-> (loss, CE, KD) token sums; only the loss (the CE, or the blend with a teacher) has a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, recompute: bool, teacher):
        device_type = hidden.device.type
        dtype = _compute_dtype(device_type, weight)
        want_grad = any(ctx.needs_input_grad[:3])  # (grad mode is off inside forward itself)
        with torch.autocast(device_type, enabled=False):
            h = hidden.reshape(-1, hidden.shape[-1])
            w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
            grads = _Grads(h, weight, bias) if want_grad and not recompute else None
            sums = _chunks(h, labels.reshape(-1), w, b, chunk, teacher, grads)
        ctx.chunk, ctx.recompute, ctx.dtype, ctx.teacher = chunk, recompute, dtype, teacher if recompute else None
        ctx.shape, ctx.has_bias = hidden.shape, bias is not None
        if recompute:
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            ctx.grads = grads
        loss, ce, kd = sums.unbind()
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        if ctx.recompute:
            hidden, weight, bias, labels = ctx.saved_tensors
            with torch.autocast(hidden.device.type, enabled=False):
                h = hidden.reshape(-1, hidden.shape[-1])
                w, b = weight.to(ctx.dtype), bias.to(ctx.dtype) if bias is not None else None
                grads = _Grads(h, weight, bias)
                _chunks(h, labels.reshape(-1), w, b, ctx.chunk, ctx.teacher, grads)
            ctx.teacher = None
        else:
            grads, ctx.grads = ctx.grads, None
        d_hidden, d_weight, d_bias = grads.scaled(grad_loss)
        return d_hidden.reshape(ctx.shape), d_weight, d_bias, None, None, None, None


class _Grads:
    """d hidden, d weight (fp32 accumulator) and d bias of the chunks seen so far."""

    def __init__(self, h, weight, bias):
        self.hidden = torch.empty_like(h)
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
        self.weight_dtype = weight.dtype
        self.bias_dtype = bias.dtype if bias is not None else None

    def add(self, start: int, hc, p, w) -> None:
        self.hidden[start:start + hc.shape[0]] = p @ w
        if p.dtype == torch.float32:
            self.weight.addmm_(p.t(), hc)
        else:  # low-precision matmul, fp32 accumulation over chunks
            self.weight.add_(p.t() @ hc)
        if self.bias is not None:
            self.bias.add_(p.sum(0).float())

    def scaled(self, g):
        """The gradients times the loss's incoming gradient, in place (no second weight-sized tensor)."""
        d_bias = self.bias.mul_(g).to(self.bias_dtype) if self.bias is not None else None
        return self.hidden.mul_(g.to(self.hidden.dtype)), self.weight.mul_(g).to(self.weight_dtype), d_bias


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, chunk: int, recompute: bool = False,
                         teacher: TeacherChunks | None = None) -> torch.Tensor:
    """sum over real targets of CE(hidden @ weight.T + bias, labels), never holding more than `chunk` rows of
    logits; labels of IGNORE_INDEX count for nothing. With a teacher: the sum of (1 - r) CE + r T^2 KL instead."""
    return linear_loss_parts(hidden, weight, bias, labels, chunk, recompute, teacher)[0]


def linear_loss_parts(hidden, weight, bias, labels, chunk: int, recompute: bool = False,
                      teacher: TeacherChunks | None = None):
    """(loss, CE, KD) token sums as linear_cross_entropy computes them; CE and KD carry no gradient."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, recompute, teacher)


class LossHead(nn.Linear):
    """The model's output head, returning the loss of the targets it was handed instead of logits."""

    def __init__(self, head: nn.Linear, chunk: int | None, recompute: bool, fused=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, head.bias  # the same Parameters: ties and names survive
        self.chunk = chunk_tokens(head.out_features, chunk)
        self.recompute = recompute
        self.fused = fused  # (hidden, weight, bias, labels) -> token-sum loss; None: linear_cross_entropy
        self._labels = None
        self._teacher = None
        self._returned = None
        self.parts = None  # (CE, KD) token sums of the last forward with a teacher

    @contextlib.contextmanager
    def targets(self, labels: torch.Tensor, teacher: TeacherChunks | None = None):
        self._labels, self._teacher = labels, teacher
        try:
            yield
        finally:
            self._labels = self._teacher = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            raise RuntimeError("LossHead called outside LossHead.targets(labels): the loss needs the labels")
        if self.fused is not None:
            loss = self.fused(hidden, self.weight, self.bias, self._labels)
        else:
            loss, ce, kd = linear_loss_parts(hidden, self.weight, self.bias, self._labels, self.chunk,
                                             self.recompute, self._teacher)
            self.parts = (ce, kd) if self._teacher is not None else None
        self._returned = (loss.data_ptr(), loss.shape)
        return loss

    def loss_of(self, output: torch.Tensor, model_name: str) -> torch.Tensor:
        """The loss the model handed back, refused if its forward changed what the head returned."""
        if (output.data_ptr(), output.shape) != self._returned:
            raise UserError(f"the forward of {model_name} changes the output head's result (e.g. logit soft-capping "
                            "or scaling), so the loss cannot be computed inside the head; use loss=ce")
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss chunk={self.chunk} tokens, recompute={self.recompute}"


class HiddenHead(nn.Linear):
    """A distillation teacher's output head when the student's loss is computed in its head: the forward hands
    back the last hidden states untouched (no `[tokens, vocab]` logits), and `chunks` gives the student's head
    what it needs to form the teacher's logits a chunk at a time."""

    def __init__(self, head: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, head.bias
        self._returned = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._returned = (hidden.data_ptr(), hidden.shape)
        return hidden

    def chunks(self, output: torch.Tensor, model_name: str, kd_ratio: float, temperature: float) -> TeacherChunks:
        """Collective under a sharded layout (the head's weight is gathered whole: the teacher is frozen)."""
        if (output.data_ptr(), output.shape) != self._returned:
            raise UserError(f"the forward of the teacher {model_name} changes its output head's result (e.g. logit "
                            "soft-capping or scaling), so its logits cannot be formed inside the student's head; use "
                            "loss=ce with this teacher")
        whole = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in (self.weight, self.bias)
                 if t is not None]
        return TeacherChunks(output, whole[0], whole[1] if len(whole) > 1 else None, kd_ratio, temperature)


def install_hidden(model: nn.Module, model_name: str) -> HiddenHead:
    """Swap the (meta-device) teacher's output head for a HiddenHead sharing its parameters."""
    base = hf_base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise UserError(f"the teacher {model_name}'s output head is {type(head).__name__}, not a plain Linear layer, "
                        "so its logits cannot be formed inside the student's head; use loss=ce with this teacher")
    owner, name = parent_of(base, head)
    swapped = HiddenHead(head)
    setattr(owner, name, swapped)
    return swapped


def install(model: nn.Module, chunk: int | None, recompute: bool, fused=None, option: str = "") -> LossHead:
    """Swap the output head of (meta-device) `model` for a LossHead sharing its parameters; refuse heads that
    are not a plain linear layer (an adapter on the head, a custom module)."""
    base = hf_base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        what = "none" if head is None else type(head).__name__
        raise UserError(f"loss={option} computes the loss inside the output head, which must be a plain Linear layer; "
                        f"{type(base).__name__}'s is {what} (an adapter on lm_head?); use loss=ce or leave the head "
                        "out of peft.target_modules")
    owner, name = parent_of(base, head)
    swapped = LossHead(head, chunk, recompute, fused)
    setattr(owner, name, swapped)
    return swapped
