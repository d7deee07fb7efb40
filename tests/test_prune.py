"""Students cut by measured importance (distill/prune.py), healing by token-level distillation on the
task's own texts, and the recipe keys that ask for them. Tiny random llamas with the real tokenizer."""
import copy
import json

import pytest
import torch
import yaml
from conftest import make_tiny_llama, write_class_data, write_recipe

from distill.config import StudentConfig, load_recipe
from distill.errors import UsageError
from distill.student import cut as prune
from distill.student.build import build_student
from distill.student.cut import cut


def tiny_gqa(layers=6, seed=0):
    """A random llama with 4 query heads over 2 key/value heads (so heads and groups can be pruned)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def texts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 320, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def logits(model, batch):
    ids, mask = prune.padded(batch, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.masked_fill(~mask.bool()[..., None], 0)


def make_identity(model, block):
    """Zero the block's output projections: it then adds nothing to the residual stream."""
    with torch.no_grad():
        model.model.layers[block].self_attn.o_proj.weight.zero_()
        model.model.layers[block].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("block", [1, 4])
def test_a_block_made_an_identity_is_dropped_first(block):
    teacher, batch = tiny_gqa(), texts()
    make_identity(teacher, block)
    imp = prune.measure_importance(teacher, batch, pad=0)
    assert imp.blocks[block] == pytest.approx(0, abs=1e-9)
    assert min(v for i, v in enumerate(imp.blocks) if i != block) > 0.01
    student = cut(copy.deepcopy(teacher), StudentConfig(num_layers=5, layer_selection="importance"), batch, 0)
    assert student.distill_plan.layers == [i for i in range(6) if i != block]
    even = cut(copy.deepcopy(teacher), StudentConfig(num_layers=5), batch, 0)
    assert block in even.distill_plan.layers  # evenly spaced (drops block 3) keeps the identity


def test_importance_follows_the_measured_values_not_the_position():
    """Shrinking a block's output makes it rank lower; the rank is read off the measurements."""
    teacher, batch = tiny_gqa(), texts()
    with torch.no_grad():
        for b, scale in ((0, 0.02), (3, 0.05)):
            teacher.model.layers[b].self_attn.o_proj.weight.mul_(scale)
            teacher.model.layers[b].mlp.down_proj.weight.mul_(scale)
    imp = prune.measure_importance(teacher, batch, pad=0)
    order = sorted(range(6), key=lambda i: imp.blocks[i])
    assert set(order[:2]) == {0, 3}
    assert prune.rank_blocks(imp, 4) == [i for i in range(6) if i not in (0, 3)]


def test_width_pruning_that_keeps_everything_leaves_the_outputs_unchanged():
    teacher, batch = tiny_gqa(), texts()
    student = cut(copy.deepcopy(teacher), StudentConfig(mlp_keep=1.0, heads_keep=4, kv_heads_keep=2), batch, 0)
    assert torch.equal(logits(student, batch), logits(teacher, batch))


def test_width_pruned_student_has_the_configured_size_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, batch = tiny_gqa(), texts()
    cfg = StudentConfig(num_layers=4, layer_selection="importance", mlp_keep=0.5, kv_heads_keep=1, heads_keep=1)
    student = cut(copy.deepcopy(teacher), cfg, batch, 0)
    c = student.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim) == (4, 128, 1, 1, 32)
    per_block = 128 * 32 * 2 + 32 * 128 * 2 + 3 * 128 * 128 + 2 * 128  # q, k, v, o; MLP; the two norms
    assert sum(p.numel() for p in student.parameters()) == 320 * 128 + 128 + 4 * per_block
    plan = student.distill_plan
    assert all(len(h) == 1 and h[0] // 2 == g[0] for h, g in zip(plan.heads, plan.kv_heads))  # a head of its group
    # the kept channels are the ones measured most active
    imp = prune.measure_importance(teacher, batch, pad=0)
    first = plan.layers[0]
    assert plan.channels[0] == sorted(imp.channels[first].argsort(descending=True)[:128].tolist())
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert json.loads((tmp_path / "s" / "config.json").read_text())["intermediate_size"] == 128
    assert torch.allclose(logits(again, batch), logits(student, batch), atol=1e-6)


def test_head_counts_that_gqa_cannot_hold_are_refused():
    config = tiny_gqa(layers=1).config
    with pytest.raises(UsageError, match="kv_heads_keep"):
        prune.head_counts(config, StudentConfig(kv_heads_keep=3))
    with pytest.raises(UsageError, match="heads_keep"):
        prune.head_counts(config, StudentConfig(kv_heads_keep=1, heads_keep=3))
    assert prune.head_counts(config, StudentConfig(kv_heads_keep=1)) == (2, 1)


@pytest.mark.parametrize("sets,match", [
    (["train.student.layer_selection=importance", "train.student.num_layers=null"], "set num_layers"),
    (["train.student.mlp_keep=0"], "mlp_keep"),
    (["train.student.mlp_keep=1.5"], "mlp_keep"),
    (["train.student.heads_keep=0"], "heads_keep"),
    (["train.student.mlp_keep=0.5", "train.student.model=/x"], "used as it is"),
    (["task.prompt=Write one."], "task.prompt"),
])
def test_recipe_keys_are_range_checked(tmp_path, sets, match):
    data = write_class_data(tmp_path / "d.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", "teacher-dir", student={"num_layers": 1})
    with pytest.raises(UsageError, match=match):
        load_recipe(recipe, sets)


def dense_kl(teacher, student, seqs, positions) -> float:
    """Mean KL(teacher || student) over the full vocabulary at the positions that predict `positions`."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s, pos in zip(seqs, positions):
            ids = torch.tensor([s])
            at = torch.tensor(pos) - 1
            t = torch.log_softmax(teacher(input_ids=ids).logits[0, at].float(), -1)
            q = torch.log_softmax(student(input_ids=ids).logits[0, at].float(), -1)
            total += float((t.exp() * (t - q)).sum())
            n += len(pos)
    return total / n


def heal_teacher(out, tok_dir) -> str:
    """A tiny teacher whose blocks matter: smaller embeddings and larger block outputs than
    make_tiny_llama's, so its next-token distributions are neither flat nor a copy of the input token."""
    from distill.models.loading import load_causal_lm

    path = make_tiny_llama(out, tok_dir, layers=4, seed=3)
    model = load_causal_lm(path)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        for layer in model.model.layers:
            for w in (layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                w.weight.mul_(3)
    model.save_pretrained(path)
    return path


def test_healing_lowers_the_students_token_kl_on_held_out_texts(tmp_path, smollm2_dir):
    """A classification file's texts under one fixed prompt (task.prompt) as a generation task; generate
    caches the teacher's top-k, train heals a student pruned by importance on it; on the validation
    texts (never trained on) the student's full-vocabulary KL to the teacher falls."""
    from distill.cache.generate import run_generate
    from distill.data.leakage import split_overlaps
    from distill.data.prompts import encode_generation, task_token_ids
    from distill.data.splits import prepare_splits
    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.train import run_train

    teacher = heal_teacher(tmp_path / "t", smollm2_dir)
    data = write_class_data(tmp_path / "d.jsonl", copies=2)
    recipe = {
        "name": "heal", "workdir": str(tmp_path / "w"), "teacher": teacher,
        "task": {"type": "generation", "data": str(data), "prompt": "Write a customer message.",
                 "response_field": "text", "max_length": 40, "split": {"validation": 0.25, "holdout": 0.0}},
        "generate": {"k": 16, "batch_size": 8, "shard_size": 64},
        "train": {"alpha": 1.0, "temperature": 1.0, "epochs": 2, "lr": 3e-3, "batch_size": 4, "warmup_ratio": 0.0,
                  "keep_checkpoints": 0,
                  "student": {"num_layers": 2, "layer_selection": "importance", "mlp_keep": 0.5}},
    }
    path = tmp_path / "heal.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = load_recipe(path)
    splits = prepare_splits(r.task, r.workdir)
    assert {ex["prompt"] for ex in splits.train} == {"Write a customer message."}
    assert {ex["response"] for ex in splits.train} <= {json.loads(x)["text"] for x in data.read_text().splitlines()}
    assert not any(split_overlaps(r.task, splits))  # the texts are compared, not the prompt they share
    run_generate(r, backend="transformers")
    out = run_train(r)

    tok = load_tokenizer(teacher)
    held = encode_generation(tok, r.task, splits.validation, r.task.max_length)
    seqs, positions = [s for s, _ in held], [p for _, p in held]
    t_model = load_causal_lm(teacher).eval()
    before = build_student(r.train.student, teacher, texts=task_token_ids(r.task, splits, tok, 128, 0),
                           pad_id=tok.pad_token_id).eval()  # the same plan, untrained
    healed = load_causal_lm(str(out)).eval()
    assert healed.config.num_hidden_layers == 2 and healed.config.intermediate_size == 128
    kl_before, kl_after = dense_kl(t_model, before, seqs, positions), dense_kl(t_model, healed, seqs, positions)
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)


def test_a_pruned_label_token_student_trains_saves_and_reloads(tmp_path, tiny_model):
    """Pruning happens before the label tokens are added: the saved student has the pruned widths,
    the label tokens and rows for them, and loads as an ordinary model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models.label_tokens import label_token_ids
    from distill.train import run_train

    data = write_class_data(tmp_path / "d.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "w", tiny_model, alpha=0.0, max_steps=2,
                          keep_checkpoints=0, student={"num_layers": 1, "layer_selection": "importance",
                                                       "mlp_keep": 0.5})
    out = run_train(load_recipe(recipe))
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.intermediate_size) == (1, 128)
    ids = label_token_ids(tok, ["billing", "delivery", "login"])
    assert ids is not None and model.get_input_embeddings().weight.shape[0] >= max(ids) + 1
    info = json.loads((out / "training.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
