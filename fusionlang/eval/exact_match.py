"""Exact match: greedy decoding after a prompt, scored against a reference answer.

The rule (used by `exact_match()` tasks and `fusionlang zoo eval --zoo llm`): a row is
correct when the answer of its continuation (`_answer_of`) equals the reference answer
stripped of surrounding whitespace. Imports torch only inside functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence


def _answer_of(continuation: str, answer: str) -> str:
    """What a continuation answers, given the reference `answer`: for a whole number, the
    leading integer of the continuation's first line; otherwise that line up to the
    answer's length when it starts with the answer and the answer does not end inside a
    word of it (answer "a" is not the answer of "and"), else the whole line, stripped. A
    model that keeps writing after its answer is not penalised for it."""
    answer = answer.strip()
    line = continuation.strip().split("\n", 1)[0].strip()
    if answer.lstrip("-").isdigit():  # a number: the leading integer
        m = re.match(r"-?\d+", line)
        return m.group(0) if m else line
    if not answer or not line.startswith(answer):
        return line
    cut_word = len(line) > len(answer) and answer[-1].isalnum() and line[len(answer)].isalnum()
    return line if cut_word else answer


def exact_match(model, tok, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16,
                device: str = "cpu", on_batch: Callable | None = None, max_new_tokens: int | None = None) -> dict:
    """Greedy decoding after each prompt; a row is correct when the continuation's
    answer (`_answer_of`: its leading integer for a numeric answer, else its first line's
    prefix of the answer's length, ending at a word boundary) equals the answer exactly. Decodes at most the batch's longest answer's
    token count plus 2 tokens, or `max_new_tokens`. Left-pads the prompts for batched
    generation (the pad token: the tokenizer's, else its end-of-sequence token).

    Returns ``{"exact_match": fraction in [0, 1], "correct": int, "n": int}``."""
    import torch

    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    old = tok.padding_side
    tok.padding_side = "left"
    correct = 0
    nb = -(-len(prompts) // batch_size)
    try:
        with torch.no_grad():
            for i, start in enumerate(range(0, len(prompts), batch_size)):
                ps, ans = list(prompts[start:start + batch_size]), list(answers[start:start + batch_size])
                new = max_new_tokens or max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in ans) + 2
                batch = tok(ps, padding=True, return_tensors="pt").to(device)
                out = model.generate(**batch, max_new_tokens=new, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                for row, a in zip(out[:, batch["input_ids"].shape[1]:], ans, strict=True):
                    text = tok.decode(row, skip_special_tokens=True)
                    correct += _answer_of(text, a) == a.strip()
                if on_batch:
                    on_batch(i + 1, nb)
    finally:
        tok.padding_side = old
    return {"exact_match": correct / len(prompts) if prompts else float("nan"), "correct": correct,
            "n": len(prompts)}
