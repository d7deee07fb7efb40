"""Students cut from the teacher by measured importance, and their cost.

Importance is measured on the teacher over the task's own training texts, in one forward pass with
hooks (no gradients):

- a block's importance is how much it changes the hidden states, 1 - cos(input, output) averaged
  over the texts' tokens (ShortGPT's block influence; Gromov et al. see the same ranking): a block
  whose output equals its input scores 0 and is the first dropped;
- an MLP channel's is the mean |activation| entering `down_proj`, an attention head's the mean L2
  norm of its output entering `o_proj`, a key/value group's the sum over its query heads (Minitron's
  activation importance).

Width pruning slices the projections' rows and columns, so the student is an ordinary model of the
same architecture with smaller `intermediate_size`, `num_attention_heads` and `num_key_value_heads`
(the head size kept as `head_dim`): transformers, vLLM and the GGUF exporter load it like any other.
transformers has no head pruning for decoder models (`prune_heads` is BERT-era) and
`torch.nn.utils.prune` only masks weights, which saves nothing; hence this module.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from distill.config import StudentConfig
from distill.errors import UsageError
from distill.models.loading import count_parameters

log = logging.getLogger(__name__)

MLP_MULTIPLE = 32  # kept MLP channels are a multiple of this: GGUF block quants need rows in blocks of 32


@dataclass
class Importance:
    """Measured on the teacher: one entry per decoder block."""

    blocks: list[float]  # 1 - mean cosine between a block's input and output hidden states
    channels: list[torch.Tensor]  # [intermediate] mean |input of down_proj|
    heads: list[torch.Tensor]  # [query heads] mean L2 norm of each head's slice of the input of o_proj


@dataclass
class Plan:
    """What the student keeps of the teacher: block indices, and per kept block its MLP channels, query
    heads and key/value heads (None: all of them)."""

    layers: list[int]
    channels: list[list[int]] | None = None
    heads: list[list[int]] | None = None
    kv_heads: list[list[int]] | None = None


def needs_importance(cfg) -> bool:
    """Whether the student's construction reads measured importance (StudentConfig)."""
    return (cfg.layer_selection == "importance" and cfg.num_layers is not None and not cfg.from_teacher_layers) or \
        cfg.mlp_keep is not None or cfg.heads_keep is not None or cfg.kv_heads_keep is not None


def _layers(model):
    return model.get_decoder().layers


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_architecture(model, what: str) -> None:
    layer = _layers(model)[0]
    mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    ok = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
        all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if not ok:
        raise UsageError(f"train.student.{what}: width pruning needs llama-style blocks (mlp.gate/up/down_proj, "
                         f"self_attn.q/k/v/o_proj); {type(model).__name__} has other ones")


def padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and their attention mask."""
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _batches(texts: list[list[int]], size: int):
    ordered = sorted(texts, key=len)  # similar lengths together: little padding
    return [ordered[i: i + size] for i in range(0, len(ordered), size)]


@torch.no_grad()
def measure_importance(model, texts: list[list[int]], pad: int, batch_size: int = 8) -> Importance:
    """Block, MLP-channel and head importance of `model` over `texts` (token id lists), pad tokens left out."""
    layers = _layers(model)
    n_heads = model.config.num_attention_heads
    state = {"mask": None}
    cos = torch.zeros(len(layers), dtype=torch.float64)
    chan = [None] * len(layers)
    head = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    inputs: dict[int, torch.Tensor] = {}
    tokens = 0

    def tokens_of(x):  # [B, T, H] -> [N, H] at real tokens
        return x[state["mask"]].double()

    def block_in(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def block_out(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos[i] += torch.nn.functional.cosine_similarity(tokens_of(inputs.pop(i)), tokens_of(out), dim=-1).sum()
        return hook

    def down_in(i):
        def hook(module, args):
            a = tokens_of(args[0]).abs().sum(0)
            chan[i] = a if chan[i] is None else chan[i] + a
        return hook

    def o_in(i):
        def hook(module, args):
            x = tokens_of(args[0])
            head[i] += x.view(x.shape[0], n_heads, -1).norm(dim=-1).sum(0)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles += [layer.register_forward_pre_hook(block_in(i), with_kwargs=True),
                    layer.register_forward_hook(block_out(i), with_kwargs=True)]
        if hasattr(layer, "mlp") and hasattr(layer.mlp, "down_proj"):
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_in(i)))
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "o_proj"):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_in(i)))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(texts, batch_size):
            ids, mask = padded(batch, pad)
            state["mask"] = mask.bool()
            model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Importance([1.0 - float(c) / tokens for c in cos],
                      [c / tokens if c is not None else None for c in chan], [h / tokens for h in head])


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in index order (ties: the lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def rank_blocks(importance: Importance, n_keep: int) -> list[int]:
    """The n_keep blocks that change the hidden states most, in model order."""
    return top(torch.tensor(importance.blocks), n_keep)


def mlp_width(intermediate: int, keep: float) -> int:
    """Channels kept of `intermediate` for the fraction `keep`: rounded to a multiple of MLP_MULTIPLE
    (at least one multiple), never more than there are."""
    if keep >= 1:
        return intermediate
    return min(intermediate, max(MLP_MULTIPLE, MLP_MULTIPLE * round(intermediate * keep / MLP_MULTIPLE)))


def head_counts(config, cfg) -> tuple[int, int]:
    """(query heads, key/value heads) the student keeps per block, refused when GQA cannot hold them."""
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    kv = cfg.kv_heads_keep or n_kv
    if kv > n_kv:
        raise UsageError(f"train.student.kv_heads_keep: {kv}, but the teacher has {n_kv} key/value heads per block")
    per_group = n_q // n_kv
    q = cfg.heads_keep or kv * per_group
    if q % kv or not 1 <= q // kv <= per_group:
        raise UsageError(f"train.student.heads_keep: {q} query heads over {kv} key/value heads: expected a multiple "
                         f"of {kv} up to {kv * per_group} (the teacher has {per_group} query heads per key/value head)")
    return q, kv


def make_plan(cfg, config, importance: Importance | None) -> Plan:
    """The blocks, channels and heads a student of StudentConfig `cfg` keeps of a teacher of `config`."""
    n = config.num_hidden_layers
    if cfg.from_teacher_layers:
        bad = [i for i in cfg.from_teacher_layers if not 0 <= i < n]
        if bad:
            raise UsageError(f"train.student.from_teacher_layers: {bad} out of range; the teacher has {n} layers "
                             f"(0..{n - 1})")
        layers = list(cfg.from_teacher_layers)
    elif cfg.num_layers is not None:
        if cfg.num_layers > n:
            raise UsageError(f"train.student.num_layers: expected 1..{n}, got {cfg.num_layers}")
        if cfg.layer_selection == "importance":
            layers = rank_blocks(importance, cfg.num_layers)
        else:
            layers = evenly_spaced_layers(n, cfg.num_layers)
    else:
        layers = list(range(n))
    plan = Plan(layers)
    if cfg.mlp_keep is not None:
        width = mlp_width(config.intermediate_size, cfg.mlp_keep)
        plan.channels = [top(importance.channels[i], width) for i in layers]
    if cfg.heads_keep is not None or cfg.kv_heads_keep is not None:
        plan.heads, plan.kv_heads = _plan_heads(config, cfg, importance, layers)
    return plan


def _plan_heads(config, cfg, importance: Importance, layers: list[int]):
    """Per block: the key/value groups with the largest summed head importance, then within each kept
    group its most important query heads."""
    q, kv = head_counts(config, cfg)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_group, keep_per_group = config.num_attention_heads // n_kv, q // kv
    heads, kv_heads = [], []
    for i in layers:
        scores = importance.heads[i].view(n_kv, per_group)
        groups = top(scores.sum(1), kv)
        kv_heads.append(groups)
        heads.append([g * per_group + h for g in groups for h in top(scores[g], keep_per_group)])
    return heads, kv_heads


def _sliced(linear: torch.nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> torch.nn.Linear:
    """A new Linear holding the chosen output rows and input columns of `linear`."""
    w = linear.weight.data
    if rows is not None:
        w = w[torch.tensor(rows)]
    if cols is not None:
        w = w[:, torch.tensor(cols)]
    bias = linear.bias is not None
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if bias:
        new.bias.data.copy_(linear.bias.data[torch.tensor(rows)] if rows is not None else linear.bias.data)
    return new


def _rows_of(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


@torch.no_grad()
def prune_widths(model, plan: Plan) -> None:
    """Slice every block's MLP and attention to the plan's channels and heads (blocks already cut to
    plan.layers) and write the new widths into the config."""
    config = model.config
    if plan.channels is not None:
        _check_architecture(model, "mlp_keep")
        for layer, keep in zip(_layers(model), plan.channels):
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=keep), _sliced(mlp.up_proj, rows=keep)
            mlp.down_proj = _sliced(mlp.down_proj, cols=keep)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = len(keep)
        config.intermediate_size = len(plan.channels[0])
    if plan.heads is not None:
        _check_architecture(model, "heads_keep")
        hd = _head_dim(config)
        for layer, q, kv in zip(_layers(model), plan.heads, plan.kv_heads):
            attn = layer.self_attn
            attn.q_proj = _sliced(attn.q_proj, rows=_rows_of(q, hd))
            attn.k_proj = _sliced(attn.k_proj, rows=_rows_of(kv, hd))
            attn.v_proj = _sliced(attn.v_proj, rows=_rows_of(kv, hd))
            attn.o_proj = _sliced(attn.o_proj, cols=_rows_of(q, hd))
            attn.num_key_value_groups = len(q) // len(kv)
        config.head_dim = hd  # no longer hidden_size // heads
        config.num_attention_heads, config.num_key_value_heads = len(plan.heads[0]), len(plan.kv_heads[0])


@torch.no_grad()
def forward_tokens_per_second(model, texts: list[list[int]], pad: int, batch_size: int = 16, repeats: int = 2) -> float:
    """Forward-pass throughput (real tokens a second, no KV cache) over the first batch of `texts`, the
    best of `repeats` timed passes after one warm-up."""
    ids, mask = padded(texts[:batch_size], pad)
    ids, mask = ids.to(model.device), mask.to(model.device)
    was_training = model.training
    model.eval()
    best = float("inf")
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            if i:
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return int(mask.sum()) / best


def broadcast_plan(plan: Plan) -> Plan:
    """Rank 0's plan on every rank of a multi-process run (each rank measured; a rounding difference
    between them must not give ranks different students)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def describe(plan: Plan, config) -> str:
    """One line: what the student kept."""
    parts = [f"layers {plan.layers}"]
    if plan.channels is not None:
        parts.append(f"MLP {config.intermediate_size} channels")
    if plan.heads is not None:
        parts.append(f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads")
    return ", ".join(parts)


def evenly_spaced_layers(n_total: int, n_keep: int) -> list[int]:
    """n_keep layer indices spread over n_total, first and last included (DistilBERT-style init); make_plan
    has checked 1 <= n_keep <= n_total."""
    if n_keep == 1:
        return [0]
    return sorted({round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)})


def keep_layers(model, layers: list[int]):
    """Drop every decoder layer not in `layers` (a plan's, checked by make_plan), in place, and fix the config
    to match."""
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in layers])
    for new_idx, layer in enumerate(decoder.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def cut(model, cfg: StudentConfig, texts: list[list[int]] | None = None, pad_id: int = 0, plan=None):
    """Cut the teacher `model` in place to the student `cfg` asks for: its layers (evenly spaced, listed,
    or the most important on `texts`), MLP channels and heads. Logs the parameter count and, with
    `texts`, the forward throughput against the teacher's. The plan is kept as `model.distill_plan`."""

    if plan is None and not (cfg.from_teacher_layers or cfg.num_layers or needs_importance(cfg)):
        return model
    importance = None
    if plan is None and needs_importance(cfg):
        if not texts:
            raise UsageError("train.student: importance-ranked layers and width pruning are measured on the task's "
                             "training texts, and none were given")
        importance = measure_importance(model, texts, pad_id)
        log.info("student: block importance (1 - cos(input, output)) on %d training texts: %s", len(texts),
                 " ".join(f"{i}:{v:.3f}" for i, v in enumerate(importance.blocks)))
    plan = plan or broadcast_plan(make_plan(cfg, model.config, importance))
    n_teacher, teacher_tps = count_parameters(model), None
    if texts:
        teacher_tps = forward_tokens_per_second(model, texts, pad_id)
    n_total = model.config.num_hidden_layers
    keep_layers(model, plan.layers)
    prune_widths(model, plan)
    model.distill_plan = plan
    n = count_parameters(model)
    log.info("student: %s (%d of %d teacher layers): %.1fM parameters, %.0f%% of the teacher's %.1fM",
             describe(plan, model.config), len(plan.layers), n_total, n / 1e6, 100 * n / n_teacher, n_teacher / 1e6)
    if teacher_tps:
        tps = forward_tokens_per_second(model, texts, pad_id)
        log.info("student: forward %.0f tokens/s against the teacher's %.0f (%.2fx), on %d of the training texts",
                 tps, teacher_tps, tps / teacher_tps, min(len(texts), 16))
    return model
