"""Recipes: the typed schema, its sections and the rules between keys (read and written by
``core/recipe_loading.py``: YAML, ``--set`` overrides, one-line validation errors).

A recipe is everything a run needs to know (model, data, training, LoRA, evaluation, launch
shape). ``recipes/*.yaml`` hold the seed defaults; the launcher writes the fully resolved
recipe into every run directory, and each rank reads it back from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from launcher.core.families import is_t5_family

DEFAULT_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
EMBEDDED_MODEL = "tiny-t5"
EMBEDDED_DATA = "sample"


class ScheduleOption(NamedTuple):
    """One setting of a transformers schedule function: the values it is meaningful for, given
    train.lr, and how the refusal says what to write."""

    admits: Callable[[float, float], bool]
    needs: str


POSITIVE = ScheduleOption(lambda value, _lr: value > 0, "a number above 0")
WHOLE = ScheduleOption(lambda value, _lr: value > 0 and float(value).is_integer(), "a whole number above 0")
BELOW_LR = ScheduleOption(
    lambda value, lr: 0 <= value < lr, "a learning rate from 0 up to train.lr={lr:g}, not including it"
)
SHARE = ScheduleOption(
    lambda value, _lr: 0 <= value < 1, "a share of train.lr from 0 up to 1, not including 1"
)
# The options each schedule takes: parameters of transformers' schedule functions
# (transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION; tests/test_schedules.py checks the names).
SCHEDULE_OPTIONS: dict[str, dict[str, ScheduleOption]] = {
    "linear": {},
    "constant": {},
    "cosine": {"num_cycles": POSITIVE},
    "cosine_with_restarts": {"num_cycles": WHOLE},
    "polynomial": {"lr_end": BELOW_LR, "power": POSITIVE},
    "inverse_sqrt": {"timescale": WHOLE},
    "cosine_with_min_lr": {"num_cycles": POSITIVE, "min_lr": BELOW_LR, "min_lr_rate": SHARE},
}


# How often something happens during training: every N optimizer steps, at the end of every
# epoch (Seq2SeqTrainer's "epoch" strategies), or never (null).
Interval = Annotated[int, Field(gt=0)] | Literal["epoch"] | None


def plain_types(annotation: Any) -> set:
    """The types a field's annotation admits, with ``Annotated`` constraints stripped."""
    types = get_args(annotation) or (annotation,)
    return {get_args(t)[0] if get_origin(t) is Annotated else t for t in types}


class Section(BaseModel):
    """Base for recipe sections: unknown keys are errors, assignments are validated, and every
    float is finite (``inf``, ``.inf``, ``nan`` would train to a NaN model without a word)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: Any) -> Any:
        """YAML's ``true`` is not a count or a rate (pydantic would take it as 1)."""
        annotation = cls.model_fields[info.field_name].annotation
        types = plain_types(annotation)
        if isinstance(value, bool) and types & {int, float} and bool not in types:
            section = next(name for name, field in Recipe.model_fields.items() if field.annotation is cls)
            raise ValueError(f"{section}.{info.field_name}={value!r} is not a number")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _a_count_a_run_can_hold(cls, value: Any, info: Any) -> Any:
        """No integer key means more than 2**31 - 1 (2**32 - 1 for a seed, numpy's limit): a longer
        input, more steps or more GPUs than any run has would overflow in the tokenizer, the
        scheduler or a launcher, or never end, rather than be refused here."""
        limit = 2**32 - 1 if info.field_name == "seed" else 2**31 - 1
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            section = next(name for name, field in Recipe.model_fields.items() if field.annotation is cls)
            raise ValueError(f"{section}.{info.field_name}={value} is beyond any run (at most {limit:,})")
        return value


class ModelSection(Section):
    name: str = Field(
        "google/flan-t5-base",
        min_length=1,
        description="Hub id, local directory, or tiny-t5 (embedded, no download).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or directory (null: the model's own).")
    adapter: str | None = Field(
        None, description="A PEFT adapter directory on top of model.name (ftlaunch eval)."
    )
    precision: Literal["bf16", "fp32", "fp16"] = Field(
        "bf16", description="Autocast dtype over fp32 master weights (fp16 is refused for T5)."
    )
    dropout: float | None = Field(
        None, ge=0, lt=1, description="Override the model's dropout (null: keep it)."
    )

    @property
    def mixed_precision(self) -> str:
        """Accelerate's name for the autocast dtype (fp32: no autocast)."""
        return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.precision]


class DataSection(Section):
    dataset: str = Field(
        "knkarthick/dialogsum",
        min_length=1,
        description="Hub id, directory of {split}.jsonl/.csv/.parquet files, or sample (embedded).",
    )
    source_field: str = Field(
        "dialogue", min_length=1, description="Column holding the text to summarize (fills {dialogue})."
    )
    target_field: str | list[str] = Field(
        "summary",
        description="Column of the reference summary, or a list of columns for several references "
        "(the first is the training target; all are scored, best-of-n).",
    )
    prompt: str = Field(DEFAULT_PROMPT, description="Model input; {dialogue} is replaced by the dialogue.")
    max_source_length: int = Field(512, gt=0, description="Input tokens kept (prompt + dialogue).")
    max_target_length: int = Field(
        128,
        gt=0,
        description="Summary tokens kept as labels, the end-of-sequence token included (at least 2).",
    )
    train_split: str = Field("train", description="Split to train on.")
    validation_split: str = Field("validation", description="Split for the validation loss.")
    train_limit: int | None = Field(None, gt=0, description="First N training examples only.")
    validation_limit: int | None = Field(None, gt=0, description="First N validation examples only.")
    group_by_length: bool = Field(
        True, description="Batches of similar length: little compute spent on padding."
    )

    @model_validator(mode="after")
    def _prompt_has_dialogue(self) -> DataSection:
        if "{dialogue}" not in self.prompt:
            raise ValueError("data.prompt must contain the placeholder {dialogue}")
        return self

    @field_validator("max_target_length")
    @classmethod
    def _target_keeps_a_token(cls, value: int) -> int:
        """One label token is the end-of-sequence token alone: every summary would train as empty."""
        if value < 2:
            raise ValueError(
                f"data.max_target_length={value} keeps only the end-of-sequence token of every summary as "
                "its label, so the model learns to predict empty summaries; set it to at least 2 (the "
                "default is 128)"
            )
        return value

    @field_validator("target_field", mode="before")
    @classmethod
    def _target_is_columns(cls, value: Any) -> Any:
        columns = [value] if isinstance(value, str) else value
        if (
            not isinstance(columns, list)
            or not columns
            or any(not isinstance(c, str) or not c.strip() for c in columns)
        ):
            raise ValueError(
                f"data.target_field={value!r} must be a column name or a non-empty list of them, "
                "e.g. summary or [summary1, summary2]"
            )
        return value

    @model_validator(mode="after")
    def _fields_are_columns(self) -> DataSection:
        targets = self.target_fields
        if len(set(targets)) != len(targets):
            raise ValueError(f"data.target_field={self.target_field!r} names a column twice")
        if self.source_field in targets:
            raise ValueError(
                f"data.source_field and data.target_field both name {self.source_field!r}; "
                "the text to summarize and its summary must be different columns"
            )
        return self

    @property
    def target_fields(self) -> list[str]:
        """The reference columns, the training target first."""
        return [self.target_field] if isinstance(self.target_field, str) else list(self.target_field)


ADAM_SETTINGS = ("adam_beta1", "adam_beta2", "adam_epsilon")


class TrainSection(Section):
    method: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA adapters.")
    epochs: int = Field(1, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after N optimizer steps (before train.epochs if reached)."
    )
    micro_batch_size: int = Field(8, gt=0, description="Examples per rank per forward pass.")
    micro_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget per rank per forward pass: micro-batches of similar-length examples "
        "filled up to N padded tokens (examples x longest source + examples x longest target); "
        "replaces train.micro_batch_size when set (null: fixed micro_batch_size).",
    )
    grad_accum: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    auto_find_batch_size: bool = Field(
        False,
        description="When a training step runs out of GPU memory, continue from the newest intact checkpoint "
        "with half the micro batch (divided by its smallest factor when odd) and the accumulation multiplied "
        "to match, so every optimizer step keeps its examples (a token budget: halved, down to the longest "
        "example); these restarts do not count against launch.max_restarts (one node only).",
    )
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="Weight decay on matrices (not biases and norms).")
    optimizer: Literal["adamw", "adafactor"] = Field(
        "adamw",
        description="adamw (torch), or adafactor (transformers', as FLAN-T5 was trained; no first moment; "
        "try train.lr=1e-3). DDP: factored second moments, update clipped at RMS 1 per tensor (almost no "
        "optimizer memory). ZeRO-1/2/3: DeepSpeed steps it on flat fp32 partitions, so unfactored "
        "(4 bytes/param, partitioned) and without update clipping (an RMS over a partition would depend "
        "on the world size). Not with FSDP2.",
    )
    adam_beta1: float = Field(
        0.9, ge=0, lt=1, description="AdamW's first-moment decay (Seq2SeqTrainer's adam_beta1)."
    )
    adam_beta2: float = Field(
        0.999, ge=0, lt=1, description="AdamW's second-moment decay (0.98 is common for seq2seq fine-tuning)."
    )
    adam_epsilon: float = Field(
        1e-8, gt=0, description="AdamW's epsilon, added to the root of the second moment."
    )
    scheduler: Literal[
        "linear",
        "cosine",
        "constant",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
        "cosine_with_min_lr",
    ] = Field(
        "linear",
        description="Learning-rate schedule after warm-up (transformers' schedules, Seq2SeqTrainer's "
        "lr_scheduler_type).",
    )
    scheduler_options: dict[str, float] = Field(
        default_factory=dict,
        description="The schedule's own settings (Seq2SeqTrainer's lr_scheduler_kwargs): cosine: "
        "num_cycles (0.5: one half-wave down); cosine_with_restarts: num_cycles (whole restarts); "
        "polynomial: lr_end, power; inverse_sqrt: timescale; cosine_with_min_lr: min_lr or min_lr_rate "
        "(the floor, absolute or a share of train.lr), num_cycles.",
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Optimizer steps spent warming up, instead of train.warmup_ratio (Seq2SeqTrainer's "
        "warmup_steps; null: the ratio).",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in backward instead of keeping them: "
        "much less activation memory for ~30% more compute.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each target's probability spread over the vocabulary in the training loss "
        "(0.1 is common; val_loss stays plain cross-entropy).",
    )
    # numpy's and torch's seeding take 0 .. 2**32 - 1: a bound here is a one-line recipe error,
    # not a crash in every rank.
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for weights, dropout and data order.")
    log_every: int = Field(10, gt=0, description="Optimizer steps between metrics lines.")
    eval_every: Interval = Field(
        200,
        description="Validation loss every N optimizer steps, or at the end of every epoch with epoch "
        "(Seq2SeqTrainer's eval_strategy; always at the end; null: only then).",
    )
    eval_on_start: bool = Field(
        False,
        description="Also evaluate the original model at step 0 (Seq2SeqTrainer's eval_on_start): the "
        "validation loss, and validation ROUGE when eval.rouge_every is set; a baseline, never the best.",
    )
    checkpoint_every: Interval = Field(
        500,
        description="Checkpoint every N optimizer steps, or at the end of every epoch with epoch "
        "(Seq2SeqTrainer's save_strategy; null: only on preemption).",
    )
    keep_checkpoints: int = Field(2, gt=0, description="Newest checkpoints kept on disk.")
    best_metric: Literal["rouge1", "rouge2", "rougeL", "rougeLsum", "val_loss"] | None = Field(
        None,
        description="Keep the best evaluated step's model in final/: validation ROUGE (higher is better, "
        "measured every rouge_every steps) or val_loss (lower, every eval_every); null: the last step.",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations in a row that do not beat the best (null: never)."
    )
    early_stopping_delta: float = Field(
        0.0, ge=0, description="How much better than the best so far counts as better (early stopping)."
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model (Accelerate's dynamo, inductor) and pad batches to length "
        "buckets (source: multiples of 64, target: of 16); auto: on for GPU ranks, off for --cpu, ZeRO-3, FSDP2.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers (Accelerate's): tensorboard, mlflow, wandb, trackio, "
        "comma-separated, or none.",
    )

    @model_validator(mode="after")
    def _adam_settings_need_adamw(self) -> TrainSection:
        if self.optimizer != "adamw":
            for name in ADAM_SETTINGS:
                value = getattr(self, name)
                if value != TrainSection.model_fields[name].default:
                    raise ValueError(
                        f"train.{name}={value:g} applies to train.optimizer=adamw, not {self.optimizer}; "
                        f"drop it or use adamw"
                    )
        return self

    @model_validator(mode="after")
    def _one_warmup_length(self) -> TrainSection:
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} and train.warmup_ratio={self.warmup_ratio:g} both "
                "set the warm-up; keep one (the other null or 0)"
            )
        return self

    @model_validator(mode="after")
    def _schedule_takes_its_options(self) -> TrainSection:
        taken = SCHEDULE_OPTIONS[self.scheduler]
        for name, value in self.scheduler_options.items():
            key = f"train.scheduler_options.{name}={value:g}"
            if name not in taken:
                offered = f"it takes {', '.join(taken)}" if taken else "it takes none"
                raise ValueError(f"{key} is not an option of train.scheduler={self.scheduler}; {offered}")
            rule = taken[name]
            if not rule.admits(value, self.lr):
                raise ValueError(f"{key}: use {rule.needs.format(lr=self.lr)}")
        floors = {"min_lr", "min_lr_rate"} & set(self.scheduler_options)
        if self.scheduler == "cosine_with_min_lr" and len(floors) != 1:
            raise ValueError(
                "train.scheduler=cosine_with_min_lr needs its floor: set one of train.scheduler_options.min_lr "
                "(a learning rate) or train.scheduler_options.min_lr_rate (a share of train.lr, e.g. 0.1)"
            )
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_from_text(cls, value: Any) -> Any:
        """``tensorboard,mlflow`` (a flag or --set) or a YAML list; ``none`` (or empty): no tracker."""
        names = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if value is None or names in ([], ["none"], [""]):
            return []
        if isinstance(names, list) and len(set(names)) != len(names):
            raise ValueError(f"train.report_to={value!r} names a tracker twice")
        return names


class LoraSection(Section):
    r: int = Field(32, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling (alpha / r).")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names that get adapters; null: the model's attention query and value "
        "projections (T5, mT5: q, v; BART, mBART, Pegasus: q_proj, v_proj).",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(
        False,
        description="Rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead of alpha / r, "
        "so a larger r still learns (PEFT's use_rslora).",
    )
    use_dora: bool = Field(
        False,
        description="DoRA: learn each adapted weight's magnitude apart from its direction (PEFT's "
        "use_dora); a little more memory and compute per adapted layer.",
    )
    save_merged: bool = Field(False, description="Also write final/merged: base + adapter as one model.")

    @property
    def label(self) -> str:
        """``LoRA``, ``DoRA``, ``LoRA (rank-stabilized)``: how the report and the card name it."""
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{kind} (rank-stabilized)" if self.use_rslora else kind


# The eval.* keys that are generate() arguments (recorded with the model in final/).
GENERATION_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    "repetition_penalty",
)
# The eval.* keys that decide an evaluation's predictions and scores besides which examples it
# scores: the generation settings, the generation batches and the ROUGE variant. Two evaluations
# (the original and the fine-tuned model, or two in-training ROUGEs) compare only when they agree.
MEASUREMENT_KEYS = (*GENERATION_KEYS, "batch_size", "scoring", "use_stemmer", "split_sentences")


def shown_generation_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The generation settings worth showing from a saved record (rouge.json, ftlaunch.json): the
    lengths and beams always, the other controls where the run changed them from the default."""
    defaults = EvalSection.model_fields
    return {
        key: settings[key]
        for key in GENERATION_KEYS
        if key in settings
        and (key in ("max_new_tokens", "num_beams") or settings[key] != defaults[key].default)
    }


class EvalSection(Section):
    after_training: bool = Field(True, description="Generate + ROUGE report at the end of full/lora.")
    compare_original: bool = Field(True, description="Also score the model before fine-tuning.")
    split: str = Field("test", description="Split to generate on and score.")
    limit: int | None = Field(None, gt=0, description="First N examples of the split only.")
    batch_size: int = Field(
        16,
        gt=0,
        description="Dialogues per generate call (batches formed over the whole split, dealt to ranks).",
    )
    max_new_tokens: int = Field(128, gt=0, description="Longest generated summary, in tokens.")
    num_beams: int = Field(1, gt=0, description="Beam search width (1: greedy).")
    min_new_tokens: int = Field(0, ge=0, description="Shortest generated summary, in tokens (0: no minimum).")
    length_penalty: float = Field(
        1.0, description="Beam search only (num_beams > 1): >1 favours longer summaries, <1 shorter."
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="No n-gram of this many tokens appears twice in a summary (0: off)."
    )
    repetition_penalty: float = Field(
        1.0, gt=0, description="Divides the score of tokens already generated (1.0: off; 1.2 is common)."
    )
    scoring: Literal["best_of_n", "per_reference"] = Field(
        "best_of_n", description="Several references: best per metric, or the seed's per-row mean."
    )
    use_stemmer: bool = Field(True, description="Porter stemmer in ROUGE.")
    split_sentences: bool = Field(False, description="One sentence per line before rougeLsum.")
    report_examples: int = Field(3, ge=0, description="Example predictions shown in the report.")
    rouge_every: Interval = Field(
        None,
        description="ROUGE on the validation split every N optimizer steps of training, or at the end "
        "of every epoch with epoch (null: off).",
    )
    rouge_limit: int | None = Field(
        None, gt=0, description="First N validation dialogues for the in-training ROUGE (null: all)."
    )
    gather_weights: bool | Literal["auto"] = Field(
        "auto",
        description="ZeRO-3/FSDP2 generation: gather the whole model once, not each module once per "
        "token (auto: when it takes at most half the free memory of every rank; false: never).",
    )

    @model_validator(mode="after")
    def _generation_settings_agree(self) -> EvalSection:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"eval.min_new_tokens={self.min_new_tokens} is above eval.max_new_tokens={self.max_new_tokens}; "
                "lower it or raise eval.max_new_tokens"
            )
        if self.length_penalty != 1.0 and self.num_beams == 1:
            raise ValueError(
                f"eval.length_penalty={self.length_penalty} only acts in beam search; "
                "set eval.num_beams above 1 (e.g. 4) or leave eval.length_penalty at 1.0"
            )
        return self

    def generation(self) -> dict[str, Any]:
        """The ``generate()`` settings of every generation (evaluation, summarize, final/'s
        generation_config.json): deterministic decoding with the recipe's length and repetition
        controls."""
        return {key: getattr(self, key) for key in GENERATION_KEYS} | {"do_sample": False}


class LaunchSection(Section):
    gpus: int = Field(1, gt=0, description="Processes (GPUs) per node.")
    nodes: int = Field(1, gt=0, description="Machines.")
    zero: Literal[0, 1, 2, 3] = Field(0, description="0: DDP; 1, 2, 3: DeepSpeed ZeRO stage.")
    fsdp: bool = Field(
        False, description="Shard with PyTorch FSDP2 (fully_shard) instead of DDP; exclusive with zero 1-3."
    )
    offload: Literal["none", "optimizer", "full"] = Field(
        "none", description="CPU offload: ZeRO optimizer or full; FSDP full only."
    )
    cpu: bool = Field(False, description="Run the ranks as CPU processes (gloo).")
    main_address: str | None = Field(None, description="Multi-node: first node's address.")
    main_port: int | None = Field(None, gt=0, lt=65536, description="Multi-node: rendezvous port.")
    max_restarts: int = Field(
        0,
        ge=0,
        description="Restart a crashed training run from its newest intact checkpoint up to N times "
        "(one node; SLURM jobs requeue instead).",
    )
    # No machine rank here: it differs per node, so it is not part of a run (see render.py).

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> LaunchSection:
        if self.fsdp and self.zero:
            raise ValueError(
                f"launch.fsdp (--fsdp) and launch.zero={self.zero} (--zero {self.zero}) are two sharding "
                "engines (PyTorch FSDP2, DeepSpeed ZeRO): pick one (--zero 0 with --fsdp)"
            )
        if self.fsdp and self.offload == "optimizer":
            raise ValueError(
                "launch.offload=optimizer is DeepSpeed's; FSDP2 offloads parameters, gradients and the "
                "optimizer step together: use --offload full with --fsdp"
            )
        if self.offload != "none" and self.zero == 0 and not self.fsdp:
            raise ValueError("launch.offload needs sharding: use --zero 1, 2 or 3, or --fsdp, with --offload")
        if self.max_restarts and self.nodes > 1:
            raise ValueError(
                f"launch.max_restarts={self.max_restarts} restarts one node's ranks; with --nodes "
                f"{self.nodes} use the cluster's requeue (sbatch slurm/*.sh requeues preempted jobs) or run again "
                "with --resume auto"
            )
        if self.offload == "full" and self.zero != 3 and not self.fsdp:
            raise ValueError("launch.offload=full (parameters too) needs --zero 3; use --offload optimizer")
        return self

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)

    @model_validator(mode="after")
    def _best_metric_is_measured(self) -> Recipe:
        metric = self.train.best_metric
        if metric == "val_loss" and not self.train.eval_every:
            raise ValueError(
                "train.best_metric=val_loss needs the validation loss during training: set train.eval_every"
            )
        if metric and metric != "val_loss" and not self.eval.rouge_every:
            raise ValueError(
                f"train.best_metric={metric} needs ROUGE during training: set eval.rouge_every "
                "(e.g. the same as train.eval_every), or use train.best_metric=val_loss"
            )
        if self.train.early_stopping_patience and not metric:
            raise ValueError(
                "train.early_stopping_patience counts evaluations without a better train.best_metric: "
                "set train.best_metric (e.g. rougeLsum or val_loss)"
            )
        return self

    @model_validator(mode="after")
    def _adafactor_not_on_fsdp(self) -> Recipe:
        if self.train.optimizer == "adafactor" and self.launch.fsdp:
            raise ValueError(
                "train.optimizer=adafactor with --fsdp (FSDP2): FSDP2 hands the optimizer row shards "
                "of each weight matrix (DTensors), on which Adafactor would factor a different matrix "
                "per world size; drop --fsdp (DDP, or --zero 1/2/3: Adafactor unfactored on ZeRO's "
                "flat partitions), or use train.optimizer=adamw"
            )
        return self

    @model_validator(mode="after")
    def _no_fp16_for_t5(self) -> Recipe:
        if self.model.precision == "fp16" and is_t5_name(self.model.name):
            raise ValueError(
                "model.precision=fp16 overflows T5-family models (T5, FLAN-T5, T5 v1.1, mT5, umT5: inf/NaN "
                "activations); use bf16, or fp32 on GPUs without bf16"
            )
        if self.model.precision == "fp16" and self.launch.cpu:
            raise ValueError(
                "model.precision=fp16 needs GPU ranks (fp16 autocast and loss scaling are GPU features); "
                "use bf16 or fp32 with --cpu"
            )
        return self

    @model_validator(mode="after")
    def _auto_batch_on_one_node(self) -> Recipe:
        """The supervisor that halves the batch watches one node's ranks, as launch.max_restarts."""
        if self.train.auto_find_batch_size and self.launch.nodes > 1:
            raise ValueError(
                f"train.auto_find_batch_size=true restarts one node's ranks with a smaller micro batch; with "
                f"--nodes {self.launch.nodes} set train.micro_batch_size (or train.micro_batch_tokens) to one that "
                "fits, or run on one node"
            )
        return self

    @model_validator(mode="after")
    def _token_budget_fits_an_example(self) -> Recipe:
        budget = self.train.micro_batch_tokens
        longest = self.data.max_source_length + self.data.max_target_length
        if budget is not None and budget < longest:
            raise ValueError(
                f"train.micro_batch_tokens={budget} is smaller than the longest example: "
                f"data.max_source_length {self.data.max_source_length} + data.max_target_length "
                f"{self.data.max_target_length} = {longest} tokens; set it to at least {longest}"
            )
        return self

    @property
    def compiles(self) -> bool:
        """train.compile resolved: ``auto`` compiles on GPU ranks (inductor's CPU compile takes
        minutes and gains little there), except under ZeRO-3, FSDP2 and DoRA (refused when forced)."""
        if self.train.compile == "auto":
            dora = self.train.method == "lora" and self.lora.use_dora
            return not self.launch.cpu and self.launch.zero != 3 and not self.launch.fsdp and not dora
        return self.train.compile

    @model_validator(mode="after")
    def _compile_where_it_is_bounded(self) -> Recipe:
        """train.compile=true where it was shown to recompile without bound (2 CPU ranks, tiny-t5,
        one epoch of 7 batch shapes, measured with dynamic=True; both trained correctly, but the
        hooks' graph breaks, not the batch shapes, drive the recompilations, so compiling gains
        little there)."""
        if self.train.compile is not True:
            return self
        if self.launch.zero == 3:
            raise ValueError(
                "train.compile=true with --zero 3: DeepSpeed's ZeRO-3 parameter hooks break the compiled "
                "graph at every submodule (22 graphs for 7 batch shapes, dynamo's recompile limit hit in "
                "its _pre_backward_module_hook); compile with --zero 2 or DDP, or keep train.compile=auto "
                "(eager) with --zero 3"
            )
        if self.train.method == "lora" and self.lora.use_dora:
            raise ValueError(
                "train.compile=true with lora.use_dora: PEFT's DoRA layers break the compiled graph inside "
                "every adapted attention (58 graphs for 5 batch shapes against 3 for LoRA, dynamo's "
                "recompile limit hit, a 72 s first step on 2 CPU ranks); keep train.compile=auto (eager) "
                "with DoRA, or compile plain LoRA"
            )
        if self.launch.fsdp:
            raise ValueError(
                "train.compile=true with --fsdp: FSDP2's per-block hooks break the compiled graph at every "
                "T5Block (11 graphs for 7 batch shapes, dynamo's recompile limit hit in a transformers "
                "wrapper); compile with --zero 2 or DDP, or keep train.compile=auto (eager) with --fsdp"
            )
        return self

    def effective_batch_size(self) -> int:
        return self.train.micro_batch_size * self.train.grad_accum * self.launch.world_size


def local_model_config(name: str) -> dict[str, Any]:
    """A local model directory's config.json as a dict ({} for a hub id, tiny-t5 or no file)."""
    try:
        config = json.loads((Path(name).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def local_model_type(name: str) -> str | None:
    return local_model_config(name).get("model_type")


def is_t5_name(name: str) -> bool:
    """T5-family models overflow in fp16 (families.is_t5_family), also tiny-t5."""
    return name == EMBEDDED_MODEL or is_t5_family(local_model_type(name), name)
