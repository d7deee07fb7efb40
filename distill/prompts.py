"""Turning examples into token ids with the model's chat template.

Classification: the prompt is (system: instruction [+ label list], user: text) and each label is
an assistant answer ending with the end-of-turn token, so a label's score is the log-probability
of its full answer and labels that share a prefix stay distinct.
Generation: the prompt is (system: instruction, user: prompt) and the response is the assistant
turn; the response tokens are the targets.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TaskConfig
from .errors import UsageError


def _has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def system_text(task: TaskConfig, labels: list[str] | None) -> str:
    text = task.instruction.strip()
    if labels and task.list_labels_in_prompt:
        text = (text + " " if text else "") + "Answer with one of: " + ", ".join(labels) + "."
    return text


def prompt_ids(tok, task: TaskConfig, labels, user_text: str, shots=()) -> list[int]:
    """The prompt for one example; `shots` are earlier (text, answer) turns for few-shot prompting."""
    system = system_text(task, labels)
    if _has_template(tok):
        msgs = [{"role": "system", "content": system}] if system else []
        for text, answer in shots:
            msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        msgs.append({"role": "user", "content": user_text})
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids
    text = (system + "\n\n" if system else "")
    text += "".join(f"{t}\nAnswer: {a}\n\n" for t, a in shots)
    return tok(text + user_text + "\nAnswer:").input_ids


def answer_ids(tok, task: TaskConfig, labels, answer: str) -> list[int]:
    """Token ids of `answer` as the assistant turn, end-of-turn token included, trailing newline not."""
    if _has_template(tok):
        probe = "x"
        p = prompt_ids(tok, task, labels, probe)
        system = system_text(task, labels)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": probe}, {"role": "assistant", "content": answer}]
        full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
        if full[: len(p)] != p:
            raise ValueError("the chat template does not extend the prompt with the answer; cannot score labels")
        ids = full[len(p):]
        end = _end_of_turn_id(tok)
        if end is not None and end in ids:
            ids = ids[: ids.index(end) + 1]
        return ids
    ids = tok(" " + answer, add_special_tokens=False).input_ids
    return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])


def _end_of_turn_id(tok):
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None and i >= 0:
            return i
    return tok.eos_token_id


@dataclass
class Encoded:
    """A classification example ready for scoring."""

    prompt: list[int]
    label_index: int | None


def encode_classification(tok, task, labels, examples, max_length: int | None = None, shots=()):
    """Prompts for each example (the user text cut short if too long) and each label's answer ids.

    `max_length` bounds the prompt plus its longest answer, the tokens a causal model sees at once.
    """
    label_ids = [answer_ids(tok, task, labels, lab) for lab in labels]
    shot_pairs = [(s["text"], s["label"]) for s in shots]
    out = []
    budget = None if max_length is None else max_length - max(len(x) for x in label_ids)
    for ex in examples:
        ids = prompt_ids(tok, task, labels, ex["text"], shot_pairs)
        if budget is not None and len(ids) > budget:
            ids = _truncate_prompt(tok, task, labels, ex["text"], budget, shot_pairs)
        out.append(Encoded(ids, labels.index(ex["label"]) if ex.get("label") in labels else None))
    return out, label_ids


def _truncate_prompt(tok, task, labels, text, budget, shots=()):
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:  # the longest head of the text that fits
        mid = (lo + hi + 1) // 2
        if len(prompt_ids(tok, task, labels, " ".join(words[:mid]), shots)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    ids = prompt_ids(tok, task, labels, " ".join(words[:lo]), shots)
    if len(ids) > budget:
        raise ValueError(f"the instruction and label list alone need {len(ids)} tokens; max_length is too small")
    return ids


def generation_prompt(tok, task, example, max_length: int) -> list[int]:
    """The prompt ids of a generation example, refused when they leave no room for a response."""
    ids = prompt_ids(tok, task, None, example["prompt"])
    if len(ids) >= max_length:
        raise UsageError(f"example {example['id']}: the prompt alone fills max_length={max_length} tokens")
    return ids


def encode_generation(tok, task, examples, max_length):
    """(token ids, target positions) per example: targets are the response tokens, cut at max_length."""
    out = []
    for ex in examples:
        if ex.get("response") is None:
            raise UsageError(f"example {ex['id']} ({task.data}): no '{task.response_field}'; its response is "
                             "written by the teacher, so it exists only in the cache of `distill generate`")
        p = generation_prompt(tok, task, ex, max_length)
        seq = (p + answer_ids(tok, task, None, ex["response"]))[:max_length]
        out.append((seq, list(range(len(p), len(seq)))))
    return out
