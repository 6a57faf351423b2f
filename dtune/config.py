"""Typed config schema for dtune, registered in Hydra's ConfigStore.

``conf/config.yaml`` lists ``dtune_schema`` first in its defaults, so every YAML file and every command-line
override is merged into these dataclasses: a misspelt key or a value of the wrong type fails at start and names
the field (``Key 'lrr' is not in struct ... full_key: optim.lrr``). Range and cross-field checks that a type
cannot express live in :func:`validate`, which reports every problem at once.

The training code receives a plain :class:`DtuneConfig` (``to_dataclass``), never a ``DictConfig``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dtune.errors import ConfigError

PRECISIONS = ("bf16", "fp16", "fp32")
QUANT_TYPES = ("nf4", "fp4", "none")
KERNELS = ("bnb", "triton")
ENGINES = ("ddp", "deepspeed", "fsdp2")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("auto", "online", "offline", "disabled")
OVERLONG = ("truncate", "drop", "error")


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
    """Record format of JSONL sources: prompt_completion, alpaca, chat or text (see dtune.formats)."""
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
    """Cache the tokenized data under dtune's cache dir, keyed by data, tokenizer and settings."""
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
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names of the linear layers that get adapters (["all-linear"] for every linear but the output head)."""
    bias: str = "none"
    """Which biases train: none, all or lora_only (PEFT's ``bias``)."""


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


@dataclass
class EngineConfig:
    strategy: str = "ddp"
    """ddp (data parallel; one process trains plainly), deepspeed (ZeRO, stage below) or fsdp2 (fully_shard)."""
    zero_stage: int = 0
    """With deepspeed: 1 shards optimizer states, 2 also gradients, 3 also parameters (the 4-bit base too)."""
    offload_optimizer: bool = False
    """With deepspeed: keep optimizer states (and fp32 master weights) in CPU memory."""
    offload_params: bool = False
    """With deepspeed ZeRO-3: keep parameters in CPU memory, fetched for each layer's forward and backward."""


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
    name: str = "local"
    """How the job is started: local (this process), torchrun or slurm."""
    nproc_per_node: int = 1
    """Processes (GPUs) per node."""
    nnodes: int = 1
    """Number of nodes."""


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of model init (adapters), dropout and data order."""
    max_steps: int = 20
    """Optimizer steps to run."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one process."""
    grad_accum_steps: int = 2
    """Micro-batches accumulated per optimizer step."""
    precision: str = "bf16"
    """Compute dtype of the base and autocast: bf16, fp16 or fp32. Adapters stay in fp32."""
    eval_every: int = 10
    """Evaluate every this many steps (0: only before and after training)."""
    eval_batch_size: int = 16
    """Samples per evaluation forward."""
    save_adapter: bool = True
    """Write the trained adapter (PEFT format) to <output_dir>/adapter."""
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
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at train.precision, for MFU; null: looked up by GPU name (see dtune.flops)."""


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
    name: str = "dtune"
    """Run name (W&B run name and output folder label)."""


def conf_dir() -> Path:
    """The shipped ``conf/`` tree: beside the package in a checkout, inside it (``dtune/conf``) when installed."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "conf"
    if (checkout / "config.yaml").is_file() and (here.parent / "pyproject.toml").is_file():
        return checkout
    if (here / "conf" / "config.yaml").is_file():
        return here / "conf"
    raise ConfigError(f"config: dtune's conf/ directory is missing (looked beside and inside {here})")


def job_dir_name() -> str:
    """One output folder name per job, the same on every rank, so that all ranks share one Hydra output directory.

    DTUNE_JOB_ID if set; the Slurm job (and array task) id; torchrun's rendezvous id (``--rdzv-id``); under plain
    torchrun, the start time of the torchrun process that all local ranks share; otherwise the current time.
    """
    env = os.environ
    if env.get("DTUNE_JOB_ID"):
        return env["DTUNE_JOB_ID"]
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    started = _parent_start_time() if "LOCAL_RANK" in env else None
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started))


def _parent_start_time() -> float | None:
    """Wall-clock start of the parent process (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted after the ")" that ends the command name
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def rank_suffix() -> str:
    """'' on rank 0, '_rank<N>' elsewhere: per-rank log files in the shared output directory."""
    rank = int(os.environ.get("RANK", slurm_process_env().get("RANK", "0")))
    return "" if rank == 0 else f"_rank{rank}"


def slurm_process_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's variables for a process started by ``srun`` alone, one task per GPU (as submitit does).

    Empty when torchrun set them already (RANK present) or when the step has one task.
    """
    env = dict(os.environ) if env is None else env
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    tasks_per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "1")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": tasks_per_node.split("(")[0].split(",")[0],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        # One port per job (jobs sharing a node must not collide), the same on every task.
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-006,010],cpu1' -> 'gpu003' (what `scontrol show hostnames` lists
    first)."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist)
    assert match is not None  # the pattern matches any string, if only with empty groups
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore under the name that conf/config.yaml lists first, and the resolvers."""
    ConfigStore.instance().store(name="dtune_schema", node=DtuneConfig)
    OmegaConf.register_new_resolver("dtune_job_dir", job_dir_name, replace=True)
    OmegaConf.register_new_resolver("dtune_rank_suffix", rank_suffix, replace=True)


register_configs()


def _one_of(errors: list[str], name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")


def _positive(errors: list[str], name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{name}: must be {'>= 0' if allow_zero else '> 0'}; got {value}")


def validate(cfg: DtuneConfig) -> None:
    """Range and cross-field checks. Raises ConfigError listing every problem, each naming its field."""
    e: list[str] = []
    _positive(e, "optim.lr", cfg.optim.lr)
    _positive(e, "optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _positive(e, "optim.eps", cfg.optim.eps)
    _positive(e, "optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    _positive(e, "optim.max_grad_norm", cfg.optim.max_grad_norm)
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        e.append(f"optim.betas: must be two numbers in [0, 1); got {list(cfg.optim.betas)}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        e.append(f"optim.min_lr_ratio: must be in [0, 1]; got {cfg.optim.min_lr_ratio}")
    _one_of(e, "optim.schedule", cfg.optim.schedule, SCHEDULES)
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        e.append(f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds train.max_steps ({cfg.train.max_steps})")

    _positive(e, "lora.r", cfg.lora.r)
    _positive(e, "lora.alpha", cfg.lora.alpha)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        e.append(f"lora.dropout: must be in [0, 1); got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        e.append("lora.target_modules: must name at least one module")
    _one_of(e, "lora.bias", cfg.lora.bias, ("none", "all", "lora_only"))

    _one_of(e, "quant.quant_type", cfg.quant.quant_type, QUANT_TYPES)
    _one_of(e, "quant.kernel", cfg.quant.kernel, KERNELS)
    if cfg.quant.kernel == "triton" and cfg.quant.quant_type != "nf4":
        e.append(f"quant.kernel: triton implements NF4 only; got quant.quant_type={cfg.quant.quant_type}")
    if cfg.quant.fuse_lora and cfg.quant.kernel != "triton":
        e.append(f"quant.fuse_lora: needs quant.kernel=triton (the fused NF4 kernels); got quant.kernel={cfg.quant.kernel}")
    _one_of(e, "engine.strategy", cfg.engine.strategy, ENGINES)
    if cfg.engine.strategy == "fsdp2" and cfg.train.precision == "fp16":
        e.append("train.precision: fp16 (loss scaling) is not supported with engine.strategy=fsdp2; use bf16")
    if cfg.engine.offload_params and not (cfg.engine.strategy == "deepspeed" and cfg.engine.zero_stage == 3):
        e.append("engine.offload_params: needs engine.strategy=deepspeed and engine.zero_stage=3")
    if cfg.engine.offload_optimizer and cfg.engine.strategy != "deepspeed":
        e.append("engine.offload_optimizer: needs engine.strategy=deepspeed")
    if cfg.engine.strategy == "deepspeed" and cfg.engine.zero_stage not in (1, 2, 3):
        e.append(f"engine.zero_stage: must be 1, 2 or 3 with engine.strategy=deepspeed; got {cfg.engine.zero_stage}")

    _positive(e, "train.max_steps", cfg.train.max_steps)
    _positive(e, "train.micro_batch_size", cfg.train.micro_batch_size)
    _positive(e, "train.grad_accum_steps", cfg.train.grad_accum_steps)
    _positive(e, "train.eval_every", cfg.train.eval_every, allow_zero=True)
    _positive(e, "train.eval_batch_size", cfg.train.eval_batch_size)
    _one_of(e, "train.precision", cfg.train.precision, PRECISIONS)
    _positive(e, "train.checkpoint_every", cfg.train.checkpoint_every, allow_zero=True)
    _positive(e, "train.keep_checkpoints", cfg.train.keep_checkpoints)
    _positive(e, "train.loss_chunk_tokens", cfg.train.loss_chunk_tokens, allow_zero=True)

    _positive(e, "data.max_seq_len", cfg.data.max_seq_len)
    _positive(e, "data.eval_size", cfg.data.eval_size, allow_zero=True)
    _positive(e, "data.train_size", cfg.data.train_size)
    _one_of(e, "data.overlong", cfg.data.overlong, OVERLONG)
    _one_of(e, "data.format", cfg.data.format, ("prompt_completion", "alpaca", "chat", "text"))
    _one_of(e, "data.train_on", cfg.data.train_on, ("completion", "all"))
    _one_of(e, "data.bad_rows", cfg.data.bad_rows, ("error", "skip"))
    if cfg.data.format == "text" and cfg.data.choices:
        e.append("data.choices: the text format has no answers to score")
    if cfg.data.eval_fraction is not None and not 0.0 < cfg.data.eval_fraction < 1.0:
        e.append(f"data.eval_fraction: must be in (0, 1); got {cfg.data.eval_fraction}")
    if cfg.data.eval_source is None and cfg.data.eval_size == 0 and cfg.data.eval_fraction is None:
        e.append("data.eval_size: is 0 and data.eval_source is null, so there is nothing to evaluate on")
    if cfg.data.choices is not None and len(set(cfg.data.choices)) < 2:
        e.append(f"data.choices: needs at least two distinct answers; got {list(cfg.data.choices)}")
    if cfg.data.system_prompt is not None and not cfg.data.chat_template:
        e.append("data.system_prompt: is set but data.chat_template is false (a system prompt needs the template)")

    _one_of(e, "logger.mode", cfg.logger.mode, WANDB_MODES)
    _positive(e, "logger.log_every", cfg.logger.log_every)
    _one_of(e, "launcher.name", cfg.launcher.name, ("local", "torchrun", "slurm"))
    _positive(e, "launcher.nproc_per_node", cfg.launcher.nproc_per_node)
    _positive(e, "launcher.nnodes", cfg.launcher.nnodes)
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))


def to_dataclass(cfg: DictConfig) -> DtuneConfig:
    """Resolve interpolations and convert the composed config to the typed dataclass tree, once, at the entry."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, DtuneConfig):  # composed without the schema (a user's own config.yaml)
        raise ConfigError("config: the primary config must list 'dtune_schema' first in its defaults")
    return obj
