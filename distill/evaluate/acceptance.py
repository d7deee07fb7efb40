"""Counting a draft's acceptance and checking a speculative decode's output, whatever runtime decoded it
(speculative.py: transformers, speculative_gguf.py: llama.cpp). Pure functions over token lists."""
from __future__ import annotations

from distill.errors import DistillError

GAMMAS = (1, 2, 3, 4, 6, 8)


def counted(gammas) -> list[int]:
    """The gammas whose acceptance is counted: every one timed, and GAMMAS (counting costs one draft pass in all;
    timing costs a whole decode each)."""
    return sorted(set(GAMMAS) | set(gammas))


def verification_steps(match: list[bool], gamma: int) -> list[tuple[int, int]]:
    """(accepted, proposable) per teacher forward: a step at output position i accepts the leading proposals
    equal to the teacher's tokens (at most gamma, at most what is left) and adds the teacher's own next token."""
    steps, i, n = [], 0, len(match)
    while i < n:
        cap = min(gamma, n - i)
        a = 0
        while a < cap and match[i + a]:
            a += 1
        steps.append((a, cap))
        i += a + 1
    return steps


def acceptance_stats(matches: list[list[bool]], gamma: int) -> dict:
    """Per position j: the share of steps whose proposal j was accepted among those that reached it (all
    proposals before it accepted, and j within what was left to decode); mean accepted proposals and
    tokens per teacher forward (accepted + the teacher's bonus token), and the teacher forwards."""
    reached, accepted = [0] * gamma, [0] * gamma
    steps = total_accepted = tokens = 0
    for match in matches:
        tokens += len(match)
        for a, cap in verification_steps(match, gamma):
            steps += 1
            total_accepted += a
            for j in range(min(a + 1, cap)):
                reached[j] += 1
                accepted[j] += j < a
    return {"gamma": gamma, "acceptance_per_position": [a / r if r else None for a, r in zip(accepted, reached)],
            "reached_per_position": reached, "teacher_forwards": steps, "tokens": tokens,
            "mean_accepted": total_accepted / max(steps, 1), "tokens_per_forward": tokens / max(steps, 1)}


def first_difference(alone: list[list[int]], assisted: list[list[int]]) -> int | None:
    for i, (a, b) in enumerate(zip(alone, assisted)):
        if a != b:
            return i
    return None if len(alone) == len(assisted) else min(len(alone), len(assisted))


def check_identical(alone: list[list[int]], assisted: list[list[int]], gamma: int) -> None:
    """Greedy speculative decoding must give the teacher's own output: any difference fails the bench."""
    i = first_difference(alone, assisted)
    if i is not None:
        raise DistillError(f"assisted generation with gamma={gamma} changed the greedy output of prompt {i} "
                           "(the teacher alone and with the draft differ); no speed-up is reported for it")
