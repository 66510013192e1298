"""The lm-zoo context-recall task: key–value facts in the prompt, a question about one key, the value as answer.

    The code of Bafo is 4721. The code of Kelu is 3310. The code of Mire is 5084. Question: what is the code of
    Kelu? Answer: 3310

Keys are made-up two-syllable names, values random numbers of ``value_digits`` digits, all drawn from seeded
``random.Random`` generators, so the data depends only on the seeds. A few keys are **memorized**: each has one
fixed value that the models see many times in training (fact sentences in the pretraining mix, closed-book
questions in the recall fine-tune), so a model has a prior for them. Answering from memory instead of from the
context is then measurable: a **counterfactual** item states a different value for a memorized key, and never
states the memorized value anywhere in its context, so answering the prior (or any value the context does not
state) is a hallucination (``compress.eval.recall`` scores it). Pretraining may also hold **restatement**
documents (novel facts stated, then restated in another order after "Again:"), so that the base model learns
to look values up in its context before it ever sees the question format.

Item kinds: ``novel`` (keys never memorized), ``counterfactual`` (the asked key is memorized, the context gives
another value), ``consistent`` (the asked key is memorized and the context agrees) and ``closed_book`` (a
memorized key asked with no context; training only).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class RecallSpec:
    facts_min: int = 4
    facts_max: int = 8
    value_digits: int = 4
    memorized_keys: int = 16
    name_pool: int = 2000
    seed: int = 0


def names(seed: int) -> list[str]:
    """Every two-syllable name (consonant-vowel twice, capitalized) in a seeded order."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    pool = [(a + b).capitalize() for a in syllables for b in syllables]
    random.Random(seed).shuffle(pool)
    return pool


class RecallTask:
    """Facts, prompts and items of the recall task for one ``RecallSpec``; ``memorized`` maps key → value."""

    def __init__(self, spec: RecallSpec):
        if not 1 <= spec.facts_min <= spec.facts_max:
            raise ValueError(f"facts_min/facts_max must satisfy 1 <= min <= max (got {spec.facts_min}, "
                             f"{spec.facts_max})")
        self.spec = spec
        pool = names(spec.seed)
        if spec.memorized_keys + spec.facts_max >= min(spec.name_pool, len(pool)):
            raise ValueError(f"name_pool {spec.name_pool} is too small for {spec.memorized_keys} memorized keys and "
                             f"{spec.facts_max} facts per prompt")
        pool = pool[:spec.name_pool]
        rng = random.Random(spec.seed + 1)
        self.memorized = {k: self._value(rng) for k in pool[:spec.memorized_keys]}
        self.novel_keys = pool[spec.memorized_keys:]

    def _value(self, rng: random.Random, avoid: set[str] | frozenset = frozenset()) -> str:
        d = self.spec.value_digits
        while True:
            v = str(rng.randint(10 ** (d - 1), 10 ** d - 1))
            if v not in avoid:
                return v

    @staticmethod
    def fact(key: str, value: str) -> str:
        return f"The code of {key} is {value}."

    @staticmethod
    def question(key: str) -> str:
        return f"Question: what is the code of {key}? Answer:"

    def fact_documents(self, repeats: int, seed: int) -> list[str]:
        """Pretraining documents that state every memorized fact ``repeats`` times, a few facts per document."""
        rng = random.Random(seed)
        facts = [self.fact(k, v) for k, v in self.memorized.items() for _ in range(repeats)]
        rng.shuffle(facts)
        docs, i = [], 0
        while i < len(facts):
            n = rng.randint(2, 5)
            docs.append(" ".join(facts[i:i + n]))
            i += n
        return docs

    def restatement_document(self, rng: random.Random) -> str:
        """A few novel facts, then ``Again:`` and the same facts in another order: pretraining text in which the
        restated values can only be predicted by looking them up in the context (in-context recall without the
        question format)."""
        k = rng.randint(2, max(4, self.spec.facts_max))
        keys = rng.sample(self.novel_keys, k)
        values: list[str] = []
        for _ in keys:
            values.append(self._value(rng, set(values) | set(self.memorized.values())))
        facts = [self.fact(key, v) for key, v in zip(keys, values)]
        order = rng.sample(range(k), k)
        return " ".join(facts) + " Again: " + " ".join(facts[i] for i in order)

    def item(self, rng: random.Random, kind: str) -> dict:
        """One item: {kind, prompt, answer, context_values, prior}; the prompt ends with 'Answer:'."""
        if kind == "closed_book":
            key = rng.choice(list(self.memorized))
            return {"kind": kind, "prompt": self.question(key), "answer": self.memorized[key],
                    "context_values": [], "prior": self.memorized[key]}
        n = rng.randint(self.spec.facts_min, self.spec.facts_max)
        prior = None
        if kind == "novel":
            keys = rng.sample(self.novel_keys, n)
            asked = rng.randrange(n)
        elif kind in ("counterfactual", "consistent"):
            mem = rng.choice(list(self.memorized))
            others = rng.sample(self.novel_keys, n - 1)
            asked = rng.randrange(n)
            keys = others[:asked] + [mem] + others[asked:]
            prior = self.memorized[mem]
        else:
            raise ValueError(f"unknown recall item kind '{kind}'")
        values: list[str] = []
        for i in range(n):
            # values are distinct within a prompt, and only the memorized key's own fact may state its prior
            values.append(prior if kind == "consistent" and i == asked
                          else self._value(rng, set(values) | ({prior} if prior else set())))
        context = " ".join(self.fact(k, v) for k, v in zip(keys, values))
        return {"kind": kind, "prompt": f"{context} {self.question(keys[asked])}", "answer": values[asked],
                "context_values": values, "prior": prior if kind == "counterfactual" else None}

    def items(self, n: int, seed: int, mix: dict[str, float], exclude: frozenset[str] | set[str] = frozenset()
              ) -> list[dict]:
        """``n`` items whose kinds are drawn with the weights in ``mix`` from a generator seeded by ``seed``; an
        item whose prompt is in ``exclude`` (the held-out evaluation prompts) is drawn again."""
        rng = random.Random(seed)
        kinds, weights = zip(*[(k, w) for k, w in mix.items() if w > 0])
        out = []
        while len(out) < n:
            item = self.item(rng, rng.choices(kinds, weights)[0])
            if item["prompt"] not in exclude:
                out.append(item)
        return out
