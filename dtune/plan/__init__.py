"""``dtune plan``: per-GPU peak memory of a QLoRA run, predicted before launch.

From the composed config and the model's ``config.json`` (no weights are read):

* **parameters** come from the model built on the meta device: which linear layers bitsandbytes packs into NF4
  (all but the output head), their bytes with double-quantization constants, the rest in the compute dtype (as
  loaded: dtune does not upcast them as PEFT's ``prepare_model_for_kbit_training`` does),
  and the LoRA adapters (fp32), counted as PEFT attaches them to the meta-device model (fused projections, MoE
  experts fused into 3-D parameters);
* **gradients and optimizer states** of the adapters (Adam: two fp32 moments; DeepSpeed adds fp32 masters beside
  16-bit copies), divided over ranks as the engine shards them, on the CPU when offloaded;
* **activations** from a probe: one decoder layer of the model's own class (one of each kind where
  ``layer_types`` differ, e.g. Gemma 3's sliding and full attention), with this run's LoRA adapters, random
  weights and autocast, runs forward and backward on the CPU for two short sequences; the live tensor bytes it
  leaves for backward, and its peak in backward, per token, scale to ``micro_batch_size x max_seq_len``. With
  gradient checkpointing the run keeps each layer's input and recomputes one layer at a time; without, it keeps
  every layer's activations;
* **the loss**: logits in fp32 at labelled positions only (dtune's CompletionLoss), with their softmax and gradient;
* **temporaries**: one dequantized weight (bitsandbytes; none with ``quant.kernel=triton`` on a GPU, whose fused
  kernels never write the weight out), and under ZeRO-3/FSDP2 the gathered parameters of the layers in flight.

The prediction is the peak of tensor memory (what ``torch.cuda.max_memory_allocated`` reports); the verdict adds
the CUDA context and allocator slack. ``dtune plan --measure`` runs two steps of the config on this machine and
prints measured beside predicted.

Modules: ``shape`` (the model on the meta device: parameter bytes), ``probe`` (activation bytes of a decoder
layer), ``memory`` (the plan, the fit search, the check before training), ``measure`` (measured beside predicted;
the validation grid). The command is :mod:`dtune.commands.plan`.
"""

from dtune.plan.measure import VALIDATION_GRID, measure, validate_plans, validation_grid
from dtune.plan.memory import Plan, check_fits, fit, format_plan, make_plan

__all__ = [
    "VALIDATION_GRID",
    "Plan",
    "check_fits",
    "fit",
    "format_plan",
    "make_plan",
    "measure",
    "validate_plans",
    "validation_grid",
]
