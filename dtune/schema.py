"""The typed config schema: one dataclass per config group, each field with its default and meaning.

Registered in Hydra's ConfigStore by :mod:`dtune.config` (``dtune_schema``), so every YAML file and override is
merged into these types; the training code receives a :class:`DtuneConfig`, never a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("bf16", "fp16", "fp32")
QUANT_TYPES = ("nf4", "fp4", "none")
KERNELS = ("bnb", "triton")
ENGINES = ("ddp", "deepspeed", "fsdp2")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("auto", "online", "offline", "disabled")
OVERLONG = ("truncate", "drop", "error")
LORA_INITS = ("default", "gaussian", "loftq", "pissa", "olora")
BEST_METRICS = ("loss", "accuracy")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")
"""train.objective: supervised fine-tuning, or one of the preference objectives (dtune.preference)."""
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
"""pref.loss_type of train.objective=dpo."""
REFERENCE_FREE = ("orpo", "simpo")
"""Preference objectives with no reference model (no second forward, nothing to precompute)."""
DEFAULT_EPOCHS = 1.0
"""The run length when neither train.max_steps nor train.epochs is set: one pass over the training samples."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:smollm2-135m-instruct"
    """A local Hugging Face model directory, or ``builtin:<name>`` (see dtune.assets)."""
    attn_implementation: str = "sdpa"
    """Attention backend passed to transformers (sdpa, eager, flash_attention_2)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer's activations in backward instead of storing them."""
    trust_remote_code: bool = False
    """Allow model code from the model directory (off: only transformers' own architectures)."""
    add_tokens: list[str] = field(default_factory=list)
    """Tokens added to the vocabulary (e.g. domain words). The embedding (and an untied output head) grows by their
    number and their rows train beside the adapters -- only those rows (PEFT's ``trainable_token_indices``) -- and
    are saved in the adapter. Tokens the vocabulary has already: their rows train (e.g. never-trained reserved
    tokens)."""
    add_special_tokens: list[str] = field(default_factory=list)
    """As add_tokens, as special tokens (never split, dropped when decoding with skip_special_tokens), e.g.
    ['<|im_start|>', '<|im_end|>'] for ChatML on a base that lacks them."""


@dataclass
class MixSource:
    path: str = "???"
    """A data file or save_to_disk folder (or builtin:<name>)."""
    weight: float = 1.0
    """Share of the training rows: weight / sum of weights."""
    format: str | None = None
    """Record format of this source (null: data.format)."""


@dataclass
class DataConfig:
    source: str = "builtin:rotten_tomatoes"
    """A .jsonl/.json/.parquet file or save_to_disk folder of records in ``format``, or ``builtin:<name>``."""
    format: str = "prompt_completion"
    """Record format of the sources: prompt_completion, alpaca, chat (OpenAI messages, tools), sharegpt or text
    (see dtune.data.formats)."""
    train_on: str = "completion"
    """Which tokens carry loss: completion (assistant turns) or all."""
    eval_source: str | None = None
    """Held-out JSONL file; when null, ``eval_size`` rows are held out from ``source``."""
    eval_size: int = 96
    """Rows held out from ``source`` for evaluation when ``eval_source`` is null."""
    eval_fraction: float | None = None
    """Hold out this fraction of the rows instead of eval_size (with data.mix: of each source)."""
    mix: list[MixSource] = field(default_factory=list)
    """Several sources mixed by weight (replaces ``source``), e.g. [{path: a.jsonl, weight: 3}, {path: b.parquet}]."""
    train_size: int | None = None
    """Use at most this many training rows (null: all)."""
    max_seq_len: int = 256
    """Longest tokenized sample; longer ones are handled per ``overlong``."""
    overlong: str = "truncate"
    """What to do with samples longer than max_seq_len: truncate, drop, or error."""
    packing: bool = False
    """Pack training samples into rows of max_seq_len tokens; attention stays within each sample."""
    bad_rows: str = "error"
    """A malformed record: error (stop, naming file and line) or skip (count it, warn, go on)."""
    cache: bool = True
    """Cache the tokenized data under dtune's cache dir, keyed by data, tokenizer and settings. Without the cache
    every rank tokenizes on its own (in memory)."""
    num_proc: int | None = None
    """Processes tokenizing on each node (``datasets``' map ``num_proc``) while the node's other ranks wait; null: the
    cores the local main process may run on (with ``cache=false``, where every rank tokenizes: its share of them).
    Small sets (under 2,000 rows per process) use fewer. With ``streaming``: each rank's DataLoader
    workers are num_proc // ranks on the node (at least 1); null: the rank's cores less one, at most 4."""
    streaming: bool = False
    """Stream the training rows from the source files instead of tokenizing them all before training (corpora larger
    than memory or disk budget): ``source`` is a .jsonl or .parquet file, a folder or a glob of them; tokenized on
    the fly by worker processes, split across ranks, resumable (dtune.data.stream). Needs train.max_steps; not with
    mix, train_size, eval_fraction or a built-in source. Held out: eval_source, else the first eval_size rows of the
    first shard."""
    chat_template: bool = True
    """Render rows with the tokenizer's chat template (ChatML if it has none); false: plain prompt + completion."""
    system_prompt: str | None = None
    """Optional system message placed before each prompt (with chat_template)."""
    choices: list[str] | None = None
    """Closed answer set (e.g. [positive, negative]): evaluation then also reports accuracy."""
    seed: int = 0
    """Seed of the train/eval split and of the shuffle order."""


@dataclass
class LoraConfig:
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: the adapter output is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Names of the linear layers that get adapters, e.g. [q_proj, v_proj]; [all-linear]: every linear layer but the
    output head, whatever the family calls them (q/k/v/o_proj and gate/up/down_proj in Llama, qkv_proj and
    gate_up_proj in Phi-3)."""
    bias: str = "none"
    """Which biases train: none, all or lora_only (PEFT's ``bias``)."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353; PEFT's ``use_dora``): each adapted weight is split into a trained
    magnitude vector (out_features values) and a direction the LoRA update moves. Slower per step than LoRA; runs
    PEFT's path even with quant.fuse_lora."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): scale the adapter by alpha / sqrt(r) instead of alpha / r, so
    higher ranks keep learning."""
    init: str = "default"
    """Adapter initialisation (PEFT's ``init_lora_weights``): default (A Kaiming-uniform, B zero), gaussian (A
    normal with std 1/r), loftq (A, B fitted to the 4-bit quantization error of each weight, from the base's
    safetensors: LoftQ, arXiv:2310.08659; CUDA only), pissa or olora (principal components or a QR factor moved out
    of the base weight into the adapter; 16-bit base only: quant=none). Combinations PEFT cannot train are refused at
    start, with the reason."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (PEFT's ``modules_to_save``), e.g.
    [lm_head] (a name matches the end of module names at a dot). Their parameters train in fp32: mind the memory (dtune plan counts them)."""
    layers_to_transform: list[int] | None = None
    """Decoder layer indices that get adapters (null: all), e.g. [20, 21, 22, 23] for the last four of 24."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Ranks other than ``r`` for the modules whose names match a key (a regular expression matched at the end of
    the module name, PEFT's ``rank_pattern``), e.g. {down_proj: 8, layers.0.self_attn.q_proj: 64}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Alphas other than ``alpha`` by module name, as rank_pattern."""


@dataclass
class QuantConfig:
    quant_type: str = "nf4"
    """4-bit data type of the frozen base (nf4, fp4), or none for an unquantized base."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (about 0.37 bits/parameter saved)."""
    kernel: str = "bnb"
    """Matmul of the 4-bit base layers: bnb (bitsandbytes dequantize + matmul) or triton (dtune's fused NF4
    kernels; on CPU their pure-torch references run)."""
    fuse_lora: bool = False
    """With kernel=triton: each LoRA adapter runs inside its base layer's fused kernel (the low-rank term added in
    the matmul's epilogue, forward and input gradient) instead of as PEFT's separate matmuls and adds. Layers with
    LoRA dropout (lora.dropout > 0), DoRA or adapter biases keep PEFT's path."""
    experts: bool = True
    """MoE bases: the fused experts in NF4 too, per expert, as they load (false: compute dtype); matmuls per kernel."""


@dataclass
class EngineConfig:
    strategy: str = "ddp"
    """ddp (data parallel; one process trains plainly), deepspeed (ZeRO, stage below) or fsdp2 (fully_shard)."""
    zero_stage: int = 0
    """With deepspeed: 1 shards optimizer states, 2 also gradients, 3 also parameters (the 4-bit base too)."""
    offload_optimizer: bool = False
    """With deepspeed: keep optimizer states (and fp32 master weights) in CPU memory; with fsdp2: as offload_params."""
    offload_params: bool = False
    """With deepspeed ZeRO-3 or fsdp2: keep parameters in CPU memory, fetched for each layer's forward and backward
    (fsdp2: torch's CPUOffloadPolicy, which also keeps gradients and optimizer states there, so offload_optimizer
    must be set alike)."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate, reached after warmup."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 3
    """Linear warmup from 0 to lr over this many optimizer steps."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (null: no clipping)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354; PEFT's ``create_loraplus_optimizer``): the B matrices (and DoRA
    magnitudes) learn at lr times this ratio, the A matrices at lr (e.g. 16), LoRA on embedding layers at PEFT's 1e-6;
    null: one learning rate for all. Must match when resuming (the optimizer's parameter groups)."""


@dataclass
class LoggerConfig:
    wandb: bool = True
    """Log to Weights & Biases (one run per job, from rank 0)."""
    mode: str = "auto"
    """W&B mode: auto (online with an API key, else offline), online, offline, disabled."""
    project: str = "dtune"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); null: the key's default."""
    group: str | None = None
    """W&B group (sweeps put their runs in one group)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    log_every: int = 1
    """Log training metrics every this many optimizer steps."""
    plot: bool = True
    """Write loss_curve.png into the output directory at the end."""
    progress: bool = True
    """Show a progress bar (rank 0)."""


@dataclass
class LauncherConfig:
    """The size of the job: processes per node and nodes (the world size `dtune plan` assumes; what a Slurm sweep
    requests per run)."""

    nproc_per_node: int = 1
    """Processes (GPUs) per node."""
    nnodes: int = 1
    """Number of nodes."""


@dataclass
class EarlyStoppingConfig:
    """When the held-out metric stops improving, end the run (final evaluation, checkpoint and adapter as usual)."""

    enabled: bool = False
    """Stop once ``patience`` evaluations in a row (every train.eval_every steps) have not improved the metric."""
    metric: str = "loss"
    """What the best evaluation is: loss (eval/loss, lower is better) or accuracy (eval/accuracy, higher is better;
    needs data.choices). Also what train.keep_best keeps."""
    patience: int = 3
    """Evaluations in a row that do not beat the best so far by more than min_delta before the run stops."""
    min_delta: float = 0.0
    """How far (in the metric's units: loss, or accuracy as a fraction) an evaluation must beat the best so far to
    count as an improvement."""


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of model init (adapters), dropout and data order."""
    max_steps: int | None = None
    """Optimizer steps to run; null: from train.epochs (with both null: one epoch). Set one of the two."""
    epochs: float | None = None
    """Passes over the training samples instead of max_steps (fractions allowed): max_steps = ceil(epochs x steps per
    epoch), an epoch being the sampler's full steps (training rows -- packed rows with data.packing -- // (micro_batch_size
    x grad_accum_steps x ranks); the ragged tail is dropped). null: train.max_steps decides (both null: one epoch)."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one process."""
    grad_accum_steps: int = 2
    """Micro-batches accumulated per optimizer step."""
    precision: str = "bf16"
    """Compute dtype of the base and autocast: bf16, fp16 or fp32. Adapter masters stay fp32 (see README, Launching)."""
    eval_every: int = 18
    """Evaluate every this many steps (0: only before and after training)."""
    eval_batch_size: int = 16
    """Samples per evaluation forward."""
    save_adapter: bool = True
    """Write the trained adapter (PEFT format) to <output_dir>/adapter."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """End the run when the held-out metric stops improving (off by default)."""
    keep_best: bool = False
    """Keep the adapter of the best evaluation (by train.early_stopping.metric) in <output_dir>/best_adapter."""
    checkpoint_every: int = 100
    """Write a checkpoint (adapter, optimizer, schedule, data position, RNG) every this many steps (0: only at the
    end and on preemption signals) to <output_dir>/checkpoints/step-<N>."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: str | None = "auto"
    """auto: go on from the newest complete checkpoint in the output dir, if there is one (so a requeued job resumes
    by itself); a path: from that checkpoint or run dir; null: start fresh (refused if the output dir holds
    checkpoints)."""
    output_dir: str | None = None
    """Where outputs go; null: Hydra's run directory."""
    loss_chunk_tokens: int = 4096
    """Compute the loss of more labelled tokens than this per micro-batch in chunks whose logits are recomputed in
    backward (peak logits memory: one chunk); 0: all at once."""
    gpu_mem: str | None = None
    """Memory of one GPU to check the memory plan against before training (e.g. 80GiB); null: the GPU's own (no
    check on the CPU). See `dtune plan`."""
    force: bool = False
    """Train even when the memory plan predicts the config does not fit."""
    objective: str = "sft"
    """What the adapter learns: sft (the next-token loss on the trained spans); from preference pairs
    (data.format=preference) dpo, orpo or simpo; from completions labelled desirable or not (data.format=kto) kto.
    Their settings: pref.*; see dtune.preference."""
    init_adapter: str | None = None
    """Start the adapter from a trained one (its folder, or a run's output dir: its adapter/), e.g. DPO after SFT.
    lora.* must match its settings. With train.objective=dpo the reference is then that adapter, frozen: its
    log-probabilities are computed once before training (train.precompute_ref)."""
    precompute_ref: bool | None = None
    """train.objective=dpo: compute the reference's log-probabilities of every pair once before training (one forward
    a pair, cached beside the tokenized data) instead of a second forward of every micro-batch at every step (about a
    third of a DPO step's compute). null: only with train.init_adapter (which needs it)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at train.precision, for MFU; null: looked up by GPU name (see dtune.flops)."""


@dataclass
class PreferenceConfig:
    """Settings of the preference objectives (train.objective=dpo, orpo, simpo); see dtune.preference for each loss
    and its source."""

    loss_type: str = "sigmoid"
    """train.objective=dpo: sigmoid (DPO), ipo (IPO, on per-token mean log-ratios) or hinge (SLiC)."""
    beta: float | None = None
    """DPO: the strength of the pull towards the reference (the implicit reward is beta x the log-ratio; IPO: its tau,
    the target margin of the per-token log-ratios being 1 / (2 beta)); ORPO: the odds-ratio term's weight (lambda);
    SimPO: the reward scale; KTO: as DPO's. null: the objective's usual value (dpo 0.1, orpo 0.1, simpo 2.0, kto 0.1)."""
    label_smoothing: float = 0.0
    """DPO (sigmoid) only: the probability that a pair's preference label is flipped (conservative DPO), in [0, 0.5)."""
    gamma: float | None = None
    """SimPO: the target reward margin (the paper's gamma; its experiments use gamma / beta about 0.5); null: 1.0."""
    desirable_weight: float = 1.0
    """KTO: the weight of a desirable completion's loss (the paper's lambda_D; with more undesirable than desirable
    rows, raise it so that lambda_D x desirable / (lambda_U x undesirable) is in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """KTO: the weight of an undesirable completion's loss (lambda_U)."""


@dataclass
class DtuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    name: str = "dtune"
    """Run name (W&B run name and output folder label)."""
