"""Throughput accounting: the FLOPs of a QLoRA step, model FLOPs utilisation (MFU), and the device's peak.

Two bases, per step (gradient-checkpointing recomputation is not counted: this is *model* FLOPs utilisation):

* **frozen-base** -- the work QLoRA really asks for: the frozen base's linear layers run forward and input-gradient
  only (``4 N_base`` per token, no weight gradient), the LoRA adapters forward, input- and weight-gradient
  (``6 N_lora``), the output head at labelled positions only (``4 N_head`` per labelled token, as CompletionLoss
  does), and attention scores/values ``12 L d s`` per token of a sample of length ``s`` (forward plus the two
  backward products, as in PaLM's accounting);
* **6N** -- the conventional figure of full fine-tuning, ``6 N`` per token over every non-embedding parameter (head
  at every position) plus the same attention term; comparable with numbers other frameworks print.

Both add the step's forwards without gradients, ``2 N + 4 L d s`` per token with the head at labelled positions: a
preference reference's (the base alone, adapters off) unless precomputed, and KTO's forwards of its KL rows
(policy and reference).

MFU = FLOPs / (time x devices x peak). The peak is the device's dense bf16/fp16 tensor rate (table below, by device
name) or ``train.peak_tflops``; unknown (CPU, fp32, an unlisted GPU) -> MFU is not reported.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from dtune.moe import expert_shapes, is_fused_experts

# Dense (no sparsity) bf16/fp16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name(); the first
# match wins, so the specific names come first. From the vendors' datasheets.
PEAK_FLOPS_16BIT = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("MI300X", 1307e12),
)


def device_peak_flops(precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for this precision, or None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if precision not in ("bf16", "fp16") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS_16BIT if key in name), None)


Counts = tuple[int, int, int]
"""(tokens, labelled tokens, attention pairs) of some rows."""


@dataclass
class FlopCounts:
    """Per-token weights of one model, in parameters (a parameter is one multiply-add: 2 FLOPs)."""

    base_linear: int  # frozen linear weights in the decoder (quantized or not), lm_head excluded
    lora: int  # trainable adapter weights
    head: int  # output projection (vocab x hidden)
    layers: int
    attn_dim: int  # heads x head_dim: width of the attention scores/values products

    @classmethod
    def of(cls, model: nn.Module) -> FlopCounts:
        """From a (PEFT-wrapped) model, real or on the meta device. MoE experts count as active parameters: the
        ``num_experts_per_tok`` experts (and their adapters' slices) a token is routed to."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        config = base.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        top_k = getattr(text, "num_experts_per_tok", None) or 1
        base_linear = lora = 0
        active: dict[int, float] = {}  # the adapters of MoE experts: a token runs top_k of the E experts' slices
        for module in base.modules():
            if is_fused_experts(module):  # MoE experts (3-D parameters, dense or NF4): top_k of them per token
                base_linear += top_k * sum(n * k for _, n, k in expert_shapes(module).values())
            experts = getattr(module, "num_experts", 1)
            if isinstance(experts, int) and experts > 1 and hasattr(module, "lora_A"):  # PEFT's ParamWrapper
                for linear in (*module.lora_A.values(), *module.lora_B.values()):
                    active[id(linear)] = top_k / experts
        for module in base.modules():
            # nn.Linear covers bitsandbytes' 4-bit layers and LoRA's A/B (PEFT's wrapper around them is not one).
            if module is head or not isinstance(module, nn.Linear):
                continue
            numel = module.in_features * module.out_features  # a 4-bit layer packs two weights per byte
            if module.weight.requires_grad:
                lora += round(numel * active.get(id(module), 1.0))
            else:
                base_linear += numel
        head_shape = getattr(head.weight, "ds_shape", head.weight.shape) if head is not None else (0, 0)  # ZeRO-3
        return cls(
            base_linear=base_linear,
            lora=lora,
            head=int(head_shape[0]) * int(head_shape[1]),
            layers=text.num_hidden_layers,
            attn_dim=text.num_attention_heads * head_dim,
        )

    def step(
        self,
        tokens: int,
        labelled: int,
        attention_pairs: int,
        reference: Counts = (0, 0, 0),
        policy_scored: Counts = (0, 0, 0),
    ) -> dict[str, float]:
        """FLOPs of one optimizer step on ``tokens`` tokens (``labelled`` of them with a loss), where
        ``attention_pairs`` = sum over samples of length**2; plus the step's forwards without gradients, each as
        (tokens, labelled, attention pairs): ``reference`` through the base with the adapters off (a preference
        reference not precomputed), ``policy_scored`` through the model with them (KTO's KL rows). Those count on
        both bases: they are work the objective asks for."""
        attention = 12 * self.layers * self.attn_dim * attention_pairs
        frozen = 2 * (2 * self.base_linear + 3 * self.lora) * tokens + 4 * self.head * labelled + attention
        six_n = 6 * (self.base_linear + self.lora + self.head) * tokens + attention
        no_grad = self.forward(*reference, adapters=False) + self.forward(*policy_scored, adapters=True)
        return {"frozen_base": float(frozen + no_grad), "six_n": float(six_n + no_grad)}

    def forward(self, tokens: int, labelled: int, attention_pairs: int, adapters: bool) -> int:
        """FLOPs of a forward without gradients: the linear layers (with the adapters or not), the head at labelled
        positions only, attention scores and values (a third of the training step's attention term)."""
        linear = self.base_linear + (self.lora if adapters else 0)
        return 2 * linear * tokens + 2 * self.head * labelled + 4 * self.layers * self.attn_dim * attention_pairs


def attention_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Sum of squared sample lengths in a collated batch; for packed rows, per packed sample (position ids restart
    at each; the padding at a row's end, which restarts them too, is left out)."""
    lengths = batch["attention_mask"].sum(dim=1)
    if "position_ids" not in batch:
        return int((lengths * lengths).sum())
    total = 0
    for row, used in zip(batch["position_ids"], lengths.tolist(), strict=True):
        bounds = [*(row == 0).nonzero()[:, 0].tolist(), row.numel()]
        total += sum(max(0, min(end, used) - start) ** 2 for start, end in itertools.pairwise(bounds))
    return total


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """This process's peak memory so far and what was measured: CUDA memory allocated by tensors on a GPU, the
    process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"  # Linux reports KiB
