"""The experiment schema: nested frozen dataclasses whose defaults are the release's recipe.

Every field a YAML config or a `key=value` override may set lives here, typed, so the loader can
parse values by type and name the exact dotted field when something is wrong. Fields without a
default (`data.train`, `train.steps`, `checkpoint.dir`) are required: a run config must set them.
Sequences are tuples so every config is immutable and hashable.

The release (METHOD.md section 5): Qwen3-14B, LoRA rank 16 / alpha 32 on q, k, v, o, the
length-aware affine mapper, AdamW lr 1e-4, weight decay 0, no schedule, no clipping, batch 1,
seed 42, guards of 20k total / 1.8k live / 13k cache tokens, 3 branches.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

Dtype = Literal["float32", "bfloat16"]
AttnImpl = Literal["xla", "cudnn", "xla_split", "splash", "cpu"]
LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down"]
MapperKind = Literal["affine_length", "per_head_affine"]
Builder = Literal["exposure", "aggregation", "distillation"]
# The row layout of a source (data/sources.py detects it from the first row when "auto"):
# problems: GSM8K / MATH; oasst: OpenAssistant messages or trees; chat: UltraChat / ShareGPT /
# lmsys message lists; flan_cot: FLAN CoT (question, answer, rationale); flan: FLAN (inputs,
# targets); p3: T0 / P3 (prompt, completion); multihop: 2WikiMultihopQA / HotpotQA / MuSiQue;
# bfcl: Berkeley Function Calling Leaderboard; examples: rows already built (`psynth build-data`).
SourceFormat = Literal["auto", "examples", "problems", "oasst", "chat", "flan_cot", "flan", "p3", "multihop", "bfcl"]
Decay = Literal["none", "cosine", "linear"]
HandoffConvention = Literal["output_tokens", "release"]  # synthesis/handoff.py
WorkerStopTokens = Literal["chat", "eos_only"]

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@_frozen
class ModelSourceConfig:
    """Which backbone to load and how to run it."""

    # "smollm2-135m" (the embedded GGUF), a local HF directory, a hub id, or a .gguf path.
    source: str = "smollm2-135m"
    dtype: Dtype = "bfloat16"  # parameter dtype of the frozen backbone
    attn_impl: AttnImpl = "xla"  # attention kernel: XLA reference, cuDNN (GPU), xla_split (the fused-kernel layout run by XLA), splash (TPU Pallas; shard_map under a mesh), cpu (XLA, decode steps read the stacked cache in place by a C++ kernel; CPU, one device)
    zero_copy: bool = False  # the synthesizer reads branch K/V in the worker rows (re-encoding and mapper folded into attention); attn_impl xla only


@_frozen
class LoraConfig:
    """The synthesizer's LoRA adapter (scale = alpha / rank)."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[LoraTarget, ...] = ("q", "k", "v", "o")


@_frozen
class MapperConfig:
    """The cache mapper applied to re-encoded branch keys and values."""

    kind: MapperKind = "affine_length"  # the release's mapper; "per_head_affine" is ours
    hidden: int = 32


@_frozen
class HandoffConfig:
    """Which worker KV the synthesizer receives and when workers stop (synthesis/handoff.py)."""

    convention: HandoffConvention = "output_tokens"  # "release": the reference release's [P-1, P+G-1) window
    stop_tokens: WorkerStopTokens = "chat"  # "eos_only": stop on tokenizer.eos_token_id only, as the release


@_frozen
class DataSourceConfig:
    """One training or evaluation source and the example builder that turns rows into examples."""

    # local .jsonl/.json/.parquet/.csv/.tsv file or a glob of them (relative to the working
    # directory; a glob's files are read in sorted order, each file's stem naming its task), or a hub id
    path: str
    builder: Builder
    format: SourceFormat = "auto"
    # builder variant: aggregation over problems: candidates | evidence; over multihop: short |
    # reasoned (the target's form); over bfcl: schemas | calls (what one branch holds). None: the first.
    variant: Optional[str] = None
    # distillation only: read the rows with this evaluation task's converter (arc_challenge, mbpp,
    # marble_db, multihop_qa, tool_calls, mc, qa, ...: eval/tasks.py), which sets the task family;
    # None: GSM8K / MATH rows (family math)
    task: Optional[str] = None
    name: Optional[str] = None  # the source's name in the data summary (default: from the path)
    limit: Optional[int] = None  # read at most this many rows (None: all)
    cap: Optional[int] = None  # keep at most this many built examples (a seeded sample; None: all)
    # how often each kept example appears per epoch: 2.0 twice, 0.5 a seeded half, 0 never
    weight: float = 1.0
    # K of builders that choose it: one value, or several of which each example draws one (seeded by
    # its id). () = data.num_branches for problems, worked examples and distillation workers; for
    # paragraphs, every K from the supporting paragraphs' count to data.max_branches. Chat rounds,
    # functions and tool calls take K from the data (trimmed to data.max_branches).
    k: tuple[int, ...] = ()
    split: str = "train"  # hub datasets only: which split to read
    subset: Optional[str] = None  # hub datasets only: configuration name (e.g. "main" for gsm8k)


@_frozen
class DataConfig:
    """Sources, guards that skip oversized examples, and static-shape bucketing."""

    train: tuple[DataSourceConfig, ...]
    eval: tuple[DataSourceConfig, ...] = ()
    stage: Optional[str] = None  # the stage's name in logs, data_summary.json and errors
    seed: int = 42
    max_total_tokens: int = 20000  # guard: cache + live tokens of one example
    max_live_tokens: int = 1800  # guard: synthesizer prompt + target tokens
    max_cache_tokens: int = 13000  # guard: branch cache tokens, all branches together
    num_branches: int = 3  # K of builders that choose it, when a source sets no `k`
    # Examples may have any K in [min_branches, max_branches] (others are skipped, reason
    # "num_branches"); batches group examples of equal K, so each batch has one static shape.
    min_branches: int = 1
    max_branches: int = 8
    # guard: padded branch slots of one example, K x Tb (branches times the bucket of the widest
    # [worker prompt | output]): what the training step's memory grows with. None: no bound (then
    # the worst admitted batch is max_branches x the largest bucket; `psynth plan` compiles it).
    max_branch_slots: Optional[int] = None
    # Padded token lengths examples are bucketed into: one compiled shape per bucket.
    buckets: tuple[int, ...] = (2048, 4096, 8192, 12288, 16384, 20480)
    batch_size: int = 1  # global batch: examples per micro-step across all devices
    # distillation sources given as raw rows are generated once by the backbone (K sampled
    # workers, then the greedy text path writes the target) and cached in the run directory
    distill_worker_tokens: int = 256
    distill_max_new_tokens: int = 512
    distill_batch_size: int = 8


@_frozen
class LossConfig:
    """Cross-entropy on target tokens, optionally plus a token KL to the text-synthesis teacher."""

    ce_weight: float = 1.0
    kl_weight: float = 0.0  # the release has no KL term
    kl_temperature: float = 1.0


@_frozen
class TrainConfig:
    """Optimiser (AdamW), schedule and step-level options."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: Decay = "none"
    clip_norm: Optional[float] = None  # global-norm gradient clipping; None: no clipping
    grad_accum: int = 1
    seed: int = 42
    compute_dtype: Dtype = "bfloat16"
    remat: bool = False  # rematerialise layer activations in the backward pass
    # start from the mapper + LoRA of another run's newest checkpoint (a `psynth train` run dir;
    # not its optimizer state or step), e.g. stage 2 from stage 1; ignored when this run resumes
    init_from: Optional[str] = None
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)


@_frozen
class AxisRule:
    """One logical axis -> the mesh axes it is split over ([] = replicated); model/sharding.py."""

    name: str
    axes: tuple[Literal["data", "fsdp", "tensor"], ...] = ()


@_frozen
class MeshConfig:
    """Device mesh axis sizes; one axis may be -1 to take all remaining devices.

    rules: overrides of the logical-axis sharding rules (model/sharding.py DEFAULT_RULES), as
    MaxText's logical_axis_rules, e.g. [{name: vocab, axes: []}] to replicate the vocabulary.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[AxisRule, ...] = ()


@_frozen
class CheckpointConfig:
    """Where the run lives (local path or gs://) and how trainable state is saved."""

    dir: str
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True  # `async` is a Python keyword, hence the name


@_frozen
class ExperimentConfig:
    """Everything one training or evaluation run needs."""

    model: ModelSourceConfig = dataclasses.field(default_factory=ModelSourceConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    mapper: MapperConfig = dataclasses.field(default_factory=MapperConfig)
    handoff: HandoffConfig = dataclasses.field(default_factory=HandoffConfig)
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig
    eval_every: int = 0  # steps between evaluations on data.eval; 0: no periodic evaluation
    log_every: int = 10
    tensorboard: bool = True
