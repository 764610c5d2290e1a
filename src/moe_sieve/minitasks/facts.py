"""The ``facts`` mini task: made-up facts the base model has never seen, so fine-tuning must store them.

Each fact maps an invented entity (a name built from syllables, never in the pretraining corpus) and a relation
to a 2-digit value. The arithmetic task mostly teaches a format whose facts the corpus already holds; this one
needs new associations, which is where the experts' capacity (and so the choice of experts) matters.

Splits (all in one schema: ``question``, ``answer``, ``entity``, ``relation``, ``template``):

* ``train``: every fact asked with each of the training templates;
* ``test`` (recall): every fact asked exactly as in training, with the first training template;
* ``paraphrase``: every fact asked with a template never used in training.

The completion is the bare value (`` 42``, one token in the embedded model's vocabulary): no untrained token
(such as GSM8K's ``####``) sits in what is scored.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

Row = dict[str, Any]

FACT_SPLITS = ("train", "test", "paraphrase")
VALUES = range(10, 100)

RELATIONS = (
    "door number", "locker number", "lucky number", "team number", "seat number", "room number",
    "badge number", "shirt number",
)  # fmt: skip
TRAIN_TEMPLATES = ("What is the {relation} of {entity}?", "{entity} has which {relation}?")
PARAPHRASE_TEMPLATES = ("Tell me the {relation} that belongs to {entity}.", "Which {relation} does {entity} have?")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "pr", "st", "tr")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "s", "k", "l", "m", "x")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables)).title()


def _entity(rng: random.Random) -> str:
    """A two-word invented name (``Brailok Zemu``), never a name of the corpus's vocabulary."""
    return f"{_word(rng, rng.choice((2, 3)))} {_word(rng, 2)}"


def _question(template: str, entity: str, relation: str) -> str:
    text = template.format(entity=entity, relation=relation)
    return text[0].upper() + text[1:]


def _row(fact: Mapping[str, Any], template: str) -> Row:
    return {
        "question": _question(template, fact["entity"], fact["relation"]),
        "answer": str(fact["value"]),
        "entity": fact["entity"],
        "relation": fact["relation"],
        "template": template,
    }


def make_facts(rng: random.Random, n_facts: int, relations_per_entity: int = 4) -> list[dict[str, Any]]:
    """``n_facts`` distinct (entity, relation) -> value facts; each entity carries ``relations_per_entity``
    relations, so recall must tell an entity's facts apart, not only the entities."""
    if n_facts < 1:
        raise ValueError(f"facts: n_facts must be >= 1, got {n_facts}")
    if not 1 <= relations_per_entity <= len(RELATIONS):
        raise ValueError(f"facts: relations_per_entity must be in 1..{len(RELATIONS)}, got {relations_per_entity}")
    entities: list[str] = []
    seen: set[str] = set()
    n_entities = -(-n_facts // relations_per_entity)
    while len(entities) < n_entities:
        name = _entity(rng)
        if name not in seen and name.split()[0] not in seen:
            seen.update((name, name.split()[0]))
            entities.append(name)
    facts = []
    for entity in entities:
        for relation in rng.sample(RELATIONS, relations_per_entity):
            facts.append({"entity": entity, "relation": relation, "value": rng.choice(VALUES)})
    return facts[:n_facts]


def facts_splits(rng: random.Random, n_facts: int) -> dict[str, list[Row]]:
    """``train`` (every fact x every training template, shuffled), ``test`` (recall: the first training
    template's questions, which training saw verbatim) and ``paraphrase`` (held-out templates, alternating)."""
    facts = make_facts(rng, n_facts)
    train = [_row(fact, template) for fact in facts for template in TRAIN_TEMPLATES]
    rng.shuffle(train)
    test = [_row(fact, TRAIN_TEMPLATES[0]) for fact in facts]
    paraphrase = [_row(fact, PARAPHRASE_TEMPLATES[i % len(PARAPHRASE_TEMPLATES)]) for i, fact in enumerate(facts)]
    return {"train": train, "test": test, "paraphrase": paraphrase}
