"""Turning examples into token ids with the model's chat template.

Classification: the prompt is (system: instruction [+ label list], user: text) and each label is
an assistant answer ending with the end-of-turn token, so a label's score is the log-probability
of its full answer and labels that share a prefix stay distinct.
Generation: the prompt is (system: instruction, user: prompt) and the response is the assistant
turn; the response tokens are the targets.
"""
from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass

from distill.config import TaskConfig
from distill.errors import UsageError, one_line
from distill.models.label_tokens import end_of_turn_id, label_token_ids  # noqa: F401 (end_of_turn_id: used from here)

log = logging.getLogger(__name__)


# A rendered template's content slots: private-use characters around the message index.
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


# Seconds one rendering of a chat template may take: a real one takes milliseconds; a template is code from
# the model directory, and one that loops would otherwise hold every command that encodes a prompt.
TEMPLATE_TIMEOUT_S = 10.0


# Above this many labels, scoring full answers (a model without label tokens) is said to cost one answer per label.
MANY_LABELS = 100


class _TemplateTimeout(BaseException):
    """Raised by the alarm inside a rendering; a BaseException so no `except Exception` in a template's
    filters or in transformers swallows it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Interrupt the block after `seconds` (SIGALRM, so the main thread only: Python runs a signal's
    handler between bytecodes, which ends a template's loop). Elsewhere the block runs unbounded. A timer
    already set by the caller is restored with its remaining time."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise _TemplateTimeout

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3), old_interval)


def render_chat(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text for `messages`, within `TEMPLATE_TIMEOUT_S`: a template that loops, recurses
    or fails is one error naming the tokenizer, not a hang or a traceback."""
    name = getattr(tok, "name_or_path", "") or "the model"
    try:
        with _deadline(TEMPLATE_TIMEOUT_S):
            return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except _TemplateTimeout:
        raise UsageError(f"{name}: the tokenizer's chat template did not finish rendering within "
                         f"{TEMPLATE_TIMEOUT_S:g} s (a loop that never ends?); fix its chat_template") from None
    except Exception as e:  # noqa: BLE001 - the template is code from the model directory: name it, one line
        raise UsageError(f"{name}: the tokenizer's chat template failed to render ({type(e).__name__}: "
                         f"{one_line(e, 200)}); fix its chat_template") from None


def _has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def text_ids(tok, text) -> list[int]:
    """User text as tokens of plain text: a control token or label token written in the data stays
    text (`split_special_tokens`). Already tokenized text (a list of ids) is returned as is."""
    if isinstance(text, list):
        return text
    return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """A chat through the model's template: the template's own text tokenized as the template says,
    each message's content as plain text (`text_ids`), so no row of data can forge a turn."""
    marked = [{**m, "content": _SLOT.format(i)} for i, m in enumerate(messages)]
    rendered = render_chat(tok, marked, add_generation_prompt)
    parts = _SLOT_RE.split(rendered)
    if sorted(int(i) for i in parts[1::2]) != list(range(len(messages))):
        raise UsageError("the tokenizer's chat template rewrites message contents; distill cannot place the text")
    ids = []
    for j, part in enumerate(parts):
        if j % 2:
            ids += text_ids(tok, messages[int(part)]["content"])
        elif part:
            ids += tok(part, add_special_tokens=False).input_ids
    return ids


def system_text(task: TaskConfig, labels: list[str] | None) -> str:
    text = task.instruction.strip()
    if labels and task.list_labels_in_prompt:
        text = (text + " " if text else "") + "Answer with one of: " + ", ".join(labels) + "."
    return text


def prompt_ids(tok, task: TaskConfig, labels, user_text, shots=()) -> list[int]:
    """The prompt for one example; `shots` are earlier (text, answer) turns for few-shot prompting.
    user_text may be given as token ids (a text cut by tokens)."""
    system = system_text(task, labels)
    if _has_template(tok):
        msgs = [{"role": "system", "content": system}] if system else []
        for text, answer in shots:
            msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        msgs.append({"role": "user", "content": user_text})
        return chat_ids(tok, msgs, add_generation_prompt=True)
    head = (system + "\n\n" if system else "") + "".join(f"{t}\nAnswer: {a}\n\n" for t, a in shots)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("").input_ids[:1] == [tok.bos_token_id] else []
    return bos + text_ids(tok, head) + text_ids(tok, user_text) + text_ids(tok, "\nAnswer:")


def answer_ids(tok, task: TaskConfig, labels, answer: str) -> list[int]:
    """Token ids of `answer` as the assistant turn, end-of-turn token included, trailing newline not."""
    return _answers_ids(tok, task, labels, [answer])[0]


def _answers_ids(tok, task: TaskConfig, labels, answers: list[str]) -> list[list[int]]:
    """`answer_ids` of several answers after one prompt, the prompt encoded once."""
    if not _has_template(tok):
        end = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return [text_ids(tok, " " + answer) + end for answer in answers]
    probe = "x"
    p = prompt_ids(tok, task, labels, probe)
    system = system_text(task, labels)
    end = end_of_turn_id(tok)
    out = []
    for answer in answers:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": probe}, {"role": "assistant", "content": answer}]
        full = chat_ids(tok, msgs, add_generation_prompt=False)
        if full[: len(p)] != p:
            raise UsageError(f"{getattr(tok, 'name_or_path', '') or 'the model'}: the chat template does not extend "
                             "the prompt with the answer; cannot score labels")
        ids = full[len(p):]
        if end is not None and end in ids:
            ids = ids[: ids.index(end) + 1]
        out.append(ids)
    return out


def label_answers(tok, task: TaskConfig, labels: list[str]) -> list[list[int]]:
    """What is scored for each label: its label token alone when the model has label tokens (one
    position after the prompt), else its full assistant answer (scored over a prefix tree). Labels
    that are the tokenizer's own tokens are refused (`label_tokens.check_label_collisions`)."""
    tokens = label_token_ids(tok, labels)
    if tokens is not None:
        return [[t] for t in tokens]
    if len(labels) > MANY_LABELS:
        log.warning("%d labels and no label tokens in %s: every text is scored with each label's full answer, so "
                    "the teacher's time grows with the number of labels (a student gets one token per label)",
                    len(labels), getattr(tok, "name_or_path", "") or "the tokenizer")
    return _answers_ids(tok, task, labels, labels)


def _check_fixed_part(task: TaskConfig, labels, n: int, max_length: int | None, shots, with_answer: bool) -> None:
    """Refuse a max_length that the prompt without its text (and, `with_answer`, the longest answer) fills."""
    if max_length is None or (n <= max_length if with_answer else n < max_length):
        return
    listed = bool(labels) and task.list_labels_in_prompt
    parts = ["the instruction"] + ([f"the list of {len(labels)} labels"] if listed else []) + (
        [f"{len(shots)} few-shot examples"] if shots else [])
    raise UsageError(f"task.max_length: {max_length} tokens cannot hold any text: the prompt without it "
                     f"({', '.join(parts)}){' plus the longest label answer' if with_answer else ''} takes {n} tokens; "
                     "raise task.max_length" + (", or set task.list_labels_in_prompt: false" if listed else ""))


@dataclass
class Encoded:
    """A classification example ready for scoring."""

    prompt: list[int]
    label_index: int | None


def encode_classification(tok, task, labels, examples, max_length: int | None = None, shots=()):
    """Prompts for each example (the user text cut short if too long) and each label's answer ids.

    `max_length` bounds the prompt plus its longest answer, the tokens a causal model sees at once.
    """
    shot_pairs = [(s["text"], s["label"]) for s in shots]
    fixed = len(prompt_ids(tok, task, labels, [], shot_pairs))
    _check_fixed_part(task, labels, fixed, max_length, shot_pairs, False)  # before the answers: each costs a prompt
    label_ids = label_answers(tok, task, labels)
    _check_fixed_part(task, labels, fixed + max(len(x) for x in label_ids), max_length, shot_pairs, True)
    out, cut_by_tokens = [], []
    budget = None if max_length is None else max_length - max(len(x) for x in label_ids)
    for ex in examples:
        ids = prompt_ids(tok, task, labels, ex["text"], shot_pairs)
        if budget is not None and len(ids) > budget:
            ids, by_tokens = _truncate_prompt(tok, task, labels, ex["text"], budget, shot_pairs)
            if by_tokens:
                cut_by_tokens.append(ex.get("id"))
        out.append(Encoded(ids, labels.index(ex["label"]) if ex.get("label") in labels else None))
    if cut_by_tokens:
        log.warning("%d text(s) (e.g. example %s) have no word boundary within task.max_length=%s tokens (text "
                    "without spaces, such as Chinese or Japanese): cut by tokens instead of by words",
                    len(cut_by_tokens), cut_by_tokens[0], max_length)
    return out, label_ids


def _truncate_prompt(tok, task, labels, text, budget, shots=()) -> tuple[list[int], bool]:
    """The prompt with the longest head of the text that fits `budget`: whole words when at least one
    fits, else the text's first tokens. Returns (ids, whether it was cut by tokens)."""
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:  # the longest head of whole words that fits
        mid = (lo + hi + 1) // 2
        if len(prompt_ids(tok, task, labels, " ".join(words[:mid]), shots)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    by_tokens = lo == 0
    if by_tokens:  # the first word alone is too long (no spaces): keep as many of its tokens as fit
        room = budget - len(prompt_ids(tok, task, labels, [], shots))
        ids = prompt_ids(tok, task, labels, text_ids(tok, text)[:max(room, 0)], shots)
    else:
        ids = prompt_ids(tok, task, labels, " ".join(words[:lo]), shots)
    if len(ids) > budget:  # (encode_classification checked that the prompt without text fits)
        raise ValueError(f"the prompt without its text needs {len(ids)} tokens, over the budget of {budget}")
    return ids, by_tokens


def generation_prompt(tok, task, example, max_length: int, shots=()) -> list[int]:
    """The prompt ids of a generation example, refused when they leave no room for a response. `shots`:
    training examples shown first as earlier (prompt, response) turns (few-shot); they count in max_length."""
    ids = prompt_ids(tok, task, None, example["prompt"], [(s["prompt"], s["response"]) for s in shots])
    if len(ids) >= max_length:
        what = f" with {len(shots)} few-shot examples" if shots else " alone"
        raise UsageError(f"example {example['id']}: the prompt{what} fills max_length={max_length} tokens")
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


def task_token_ids(task, splits, tok, n: int, seed: int, with_answers: bool = False) -> list[list[int]]:
    """Token ids of n training examples as the task presents them to the model: the one sample that both
    importance measurement (prompts) and GPTQ calibration (prompts with their answers) read. Classification
    takes a seeded sample stratified by label; generation a seeded sample of rows (not the first n: a
    file's rows are often grouped by topic), with the response where the data has one."""
    import random

    from distill.data.sampling import subset_indices

    labels = splits.labels if task.type == "classification" else None
    if labels:
        chosen = subset_indices(splits.train, n, seed)
    else:
        chosen = sorted(random.Random(seed).sample(range(len(splits.train)), min(n, len(splits.train))))
    out = []
    for i in chosen:
        ex = splits.train[i]
        if labels:
            ids = prompt_ids(tok, task, labels, ex["text"])
            answer = ex.get("label") if with_answers else None
        else:
            ids = prompt_ids(tok, task, None, ex["prompt"])
            answer = ex.get("response")
            answer = answer if (with_answers or task.type != "classification") else None
        if answer is not None:
            ids = ids + answer_ids(tok, task, labels, answer)
        out.append(ids[: task.max_length])
    return out


def stop_ids(tok) -> list[int]:
    """Tokens that end a teacher-written response: end of turn and end of sequence."""
    out = []
    for t in (end_of_turn_id(tok), tok.eos_token_id):
        if isinstance(t, int) and t >= 0 and t not in out:
            out.append(t)
    return out
