"""LoRA and DoRA against an outside reference: a plain `peft` model built here from the numbers the user gave
(peft.r, peft.alpha, peft.target_modules, peft.use_dora), never from automodel's own LoraConfig.

Every other LoRA check compares automodel with itself (two layouts, a resume, its own export reloaded), so a
wrong formula that all layouts share passes them all: LoRA scaled by alpha instead of alpha / r once did, its
wrong alpha written into adapter_config.json too. Here, on one process and the run's own first batch:

- the reference starts from automodel's base weights and its random draw of each A (B = 0: peft's own start;
  DoRA's magnitudes are peft's own, computed from the base weights); with LoRA dropout, its step draws from the
  RNG state automodel's step started from, so a peft.dropout that did not reach the model shows;
- step 1: logits, loss and every trainable gradient equal the reference's; no other parameter trains;
- after one optimizer step (torch's clip_grad_norm_ and AdamW, weight decay on >= 2-D parameters): every
  parameter and the logits equal the reference's;
- the exported adapter_config.json holds the configured r / alpha / dora / dropout, and the adapter loaded by
  PeftModel.from_pretrained onto the base gives the reference's logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import MICRO, compose, train

STEP = ["train.max_steps=1", "train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=8",
        "optim.lr=1e-2", "optim.warmup_steps=0", "train.max_grad_norm=1.0"]
PREFIX = "base_model.model."
TOL = 1e-5  # relative to the largest magnitude compared (fp32, the same kernels in another order)


def _first_step(run_dir: str, monkeypatch, overrides: list[str]) -> dict:
    """Train one step and record what it saw: the batch, the step's logits, the parameters and gradients just
    before the optimizer step, the parameters after it."""
    from automodel.engine.loop import StepRunner

    seen = {}
    call, clip = StepRunner.__call__, StepRunner.clip_and_step

    def spy_call(self, batch):
        seen["batch"], seen["rng"] = batch, torch.get_rng_state()  # what the step's dropout draws from
        def keep(module, args, kwargs, out):
            seen.setdefault("logits", out.logits.detach().clone())

        handle = self.model.register_forward_hook(keep, with_kwargs=True)
        try:
            return call(self, batch)
        finally:
            handle.remove()

    def spy_clip(self, *args, **kwargs):
        named = list(self.model.named_parameters())
        seen["before"] = {n: p.detach().clone() for n, p in named}
        seen["grads"] = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
        return clip(self, *args, **kwargs)

    monkeypatch.setattr(StepRunner, "__call__", spy_call)
    monkeypatch.setattr(StepRunner, "clip_and_step", spy_clip)
    result = train(run_dir, *overrides, *STEP)
    monkeypatch.undo()
    seen["after"] = {n: p.detach().clone() for n, p in result.model.named_parameters()}
    seen["loss"] = result.records[0]["loss"]
    seen["model"] = result.model
    return seen


def _plain_base(hf_config, before: dict):
    """A plain transformers model holding automodel's initial base weights (peft's names mapped back)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    base = {n.removeprefix(PREFIX).replace(".base_layer.", "."): t for n, t in before.items() if ".lora_" not in n}
    model.load_state_dict(base, strict=True)
    return model


def _reference(cfg, hf_config, before: dict):
    """peft's own LoRA/DoRA model from the user's numbers, with automodel's random draw of each A copied in."""
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    targets = OmegaConf.to_container(cfg.peft.target_modules) if OmegaConf.is_config(cfg.peft.target_modules) \
        else cfg.peft.target_modules
    config = LoraConfig(r=int(cfg.peft.r), lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                        target_modules=targets, use_dora=bool(cfg.peft.use_dora), init_lora_weights=True,
                        task_type="CAUSAL_LM")
    model = get_peft_model(_plain_base(hf_config, before), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(before[name])
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _step(model, cfg, inputs: dict, labels: torch.Tensor, rng: torch.Tensor):
    """The reference's loss (mean over target tokens) and gradients, then torch's clip and one AdamW step. Its
    dropout draws from `rng`, the state automodel's step started from: the same masks in the same order."""
    model.train()
    torch.set_rng_state(rng)
    logits = model(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    o = cfg.optim
    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    assert o.warmup_steps == 0  # step 1 runs at optim.lr
    opt.step()
    return logits.detach(), float(loss.detach()), grads


CASES = {"lora": ["peft=lora"], "dora": ["peft=dora"], "lora_dropout": ["peft=lora", "peft.dropout=0.2"]}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_and_dora_equal_a_plain_peft_model_built_from_the_same_numbers(tmp_path, monkeypatch, case):
    from peft import PeftModel

    from automodel.config import validate

    overrides = CASES[case]
    cfg = compose(*MICRO, *overrides, *STEP)
    hf_config = validate(cfg).plugins["model"].hf_config()
    seen = _first_step(str(tmp_path), monkeypatch, overrides)
    ref = _reference(cfg, hf_config, seen["before"])
    (micro,) = seen["batch"].micro_batches
    inputs = {k: v for k, v in micro.items() if k != "labels"}

    # the start: B = 0, DoRA's magnitudes the row norms of the base weights, as peft makes them
    start = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    assert start.keys() == seen["grads"].keys()  # the adapters (and magnitudes) train, nothing else
    assert any(".lora_magnitude_vector." in n for n in start) == bool(cfg.peft.use_dora)
    assert max(_rel(seen["before"][n], start[n]) if start[n].abs().max() > 0 else float(seen["before"][n].abs().max())
               for n in start) < TOL

    # A itself is a random draw, peft's "gaussian" init: normal with std 1 / r
    a = torch.cat([t.flatten() for n, t in seen["before"].items() if ".lora_A." in n])
    assert a.numel() > 10_000 and abs(a.mean()) < 0.05 / cfg.peft.r and abs(a.std() * cfg.peft.r - 1) < 0.05

    logits, loss, grads = _step(ref, cfg, inputs, micro["labels"], seen["rng"])
    d_logits = _rel(seen["logits"], logits)
    d_grad = max(_rel(seen["grads"][n], grads[n]) for n in grads if grads[n].abs().max() > 0)
    assert all(float(seen["grads"][n].abs().max()) == 0 for n in grads if grads[n].abs().max() == 0)
    moved = {n for n, p in ref.named_parameters() if not torch.equal(p.detach(), seen["before"][n])}
    d_after = max(_rel(seen["after"][n], p.detach()) for n, p in ref.named_parameters())
    with torch.no_grad():  # without dropout
        after_ref = ref.eval()(**inputs).logits
        after_ours = seen["model"].eval()(**inputs).logits
    d_after_logits = _rel(after_ours, after_ref)
    print(f"{case}: step-1 logits {d_logits:.1e}, loss {abs(seen['loss'] - loss):.1e}, grads {d_grad:.1e}; after "
          f"the step: params {d_after:.1e}, logits {d_after_logits:.1e}")
    assert d_logits < TOL and abs(seen["loss"] - loss) < TOL * loss and d_grad < TOL
    assert moved and all(".lora_" in n for n in moved)  # the step changed the adapters, and only them
    assert d_after < TOL and d_after_logits < TOL

    # the export: the configured numbers, and the adapter on its base is the reference model
    with open(os.path.join(tmp_path, "final", "adapter", "adapter_config.json")) as f:
        saved = json.load(f)
    assert (saved["r"], saved["lora_alpha"], saved["use_dora"], saved["lora_dropout"]) == (
        cfg.peft.r, cfg.peft.alpha, cfg.peft.use_dora, cfg.peft.dropout)
    reloaded = PeftModel.from_pretrained(_plain_base(hf_config, seen["before"]),
                                         os.path.join(tmp_path, "final", "adapter")).eval()
    with torch.no_grad():
        assert _rel(reloaded(**inputs).logits, after_ref) < TOL
