"""Writes records_train.jsonl and records_eval.jsonl next to this file, deterministically.

Every sentence comes from the templates below (written for this project); names, ages and
cities are drawn with random.Random(seed).  Eval sentences never occur in the train split,
and a fifth of the names and cities are held out of training entirely, so eval accuracy
measures the format learned, not memorised answers."""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Mira", "Tomas", "Aiko", "Farid", "Lena", "Oskar", "Priya", "Diego", "Ingrid", "Kwame",
         "Sofia", "Yusuf", "Hana", "Mateo", "Elif", "Ravi", "Greta", "Jonas", "Amara", "Leo",
         "Noor", "Pablo", "Signe", "Chen", "Zara", "Emil", "Lucia", "Omar", "Freya", "Ken",
         "Ada", "Bruno", "Carmen", "Dmitri", "Esme", "Femi", "Gustav", "Ines", "Jin", "Kofi",
         "Lars", "Maya", "Nils", "Olga", "Rosa", "Sami", "Talia", "Uma", "Viktor", "Wren"]
CITIES = ["Oslo", "Lisbon", "Nairobi", "Kyoto", "Quito", "Tallinn", "Porto", "Accra", "Hanoi", "Lyon",
          "Bergen", "Cusco", "Dakar", "Ghent", "Izmir", "Jaipur", "Krakow", "Lagos", "Malmo", "Nantes",
          "Osaka", "Perth", "Riga", "Seville", "Tunis", "Utrecht", "Valencia", "Windhoek", "Zagreb", "Adelaide"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "{city} resident {name}, aged {age}.",
    "Age {age}; home town {city}; called {name}.",
    "Meet {name} from {city}, who is {age}.",
    "{name} ({age}) moved to {city} last spring.",
    "In {city} you will find {name}, {age} years of age.",
    "Name: {name}. City: {city}. Age: {age}.",
]
N_TRAIN, N_EVAL, SEED = 400, 32, 1234
# A short system turn of our own: without one, SmolLM2's template inserts its default
# system prompt (~20 tokens), a third of every example's length.
SYSTEM = "You turn sentences into records."


def record(rng: random.Random, names, cities) -> dict:
    name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 89)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Record: {sentence}"},
                         {"role": "assistant", "content": answer}]}


def build(seed: int = SEED) -> tuple:
    rng = random.Random(seed)
    held_names = set(rng.sample(NAMES, len(NAMES) // 5))
    held_cities = set(rng.sample(CITIES, len(CITIES) // 5))
    train_names = [n for n in NAMES if n not in held_names]
    train_cities = [c for c in CITIES if c not in held_cities]
    seen = set()

    def draw(n, names, cities):
        """n records whose sentences differ from every record drawn before."""
        out = []
        while len(out) < n:
            r = record(rng, names, cities)
            key = r["messages"][1]["content"]
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out

    train = draw(N_TRAIN, train_names, train_cities)
    evals = draw(N_EVAL, NAMES, CITIES)
    return train, evals


def main() -> None:
    here = Path(__file__).parent
    train, evals = build()
    for split, rows in (("train", train), ("eval", evals)):
        with open(here / f"records_{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
