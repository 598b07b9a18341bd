"""Simple children's stories generated from templates: the project's own corpus, NOT TinyStories.

Used where neither the Hugging Face hub nor local files are available, and by the tests, so that every
code path runs on real-looking English without a download.
"""
from __future__ import annotations

import random

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Lucy", "Jack"]
ANIMALS = ["cat", "dog", "bird", "bunny", "frog", "duck", "puppy", "bear", "fox", "mouse"]
PLACES = ["park", "garden", "forest", "beach", "farm", "pond", "hill", "yard"]
THINGS = ["ball", "kite", "red hat", "toy car", "big box", "blue cup", "shiny stone", "little boat"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "curious"]
WEATHER = ["sunny", "rainy", "windy", "warm", "cold", "cloudy"]

TEMPLATES = [
    "Once upon a time, there was a little {animal} named {name}. {name} lived near a {place}. "
    "One {weather} day, {name} found a {thing}. {name} was very {feeling}. "
    "{name} showed the {thing} to a friend. They played with it all day. At night, {name} went home and slept.",
    "{name} and {name2} went to the {place}. It was a {weather} day. {name} saw a {animal} under a tree. "
    "The {animal} looked {feeling}. \"Do not be afraid,\" said {name2}. They gave the {animal} some food. "
    "The {animal} was happy and they became good friends.",
    "One day, {name} lost a {thing} at the {place}. {name} was {feeling} and started to cry. "
    "{name2} said, \"I will help you look.\" They looked under rocks and behind trees. "
    "At last, a {animal} came with the {thing} in its mouth. {name} said, \"Thank you!\" and smiled.",
    "There was a {feeling} {animal} who wanted to see the {place}. The {animal} walked and walked. "
    "On the way, it met {name}. {name} said, \"Come with me, I know the way.\" "
    "They went to the {place} together. The {animal} learned that friends make every trip better.",
    "{name} had a {thing}. {name2} wanted to play with it too. At first, {name} did not want to share. "
    "Then {name} saw that {name2} was {feeling}. {name} gave the {thing} to {name2}. "
    "They played together in the {place}, and both of them were happy. Sharing is good.",
]


def generate_stories(n_stories: int, seed: int = 0) -> list[str]:
    """n_stories short stories, deterministic for a given seed."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n_stories):
        name, name2 = rng.sample(NAMES, 2)
        stories.append(rng.choice(TEMPLATES).format(
            name=name, name2=name2, animal=rng.choice(ANIMALS), place=rng.choice(PLACES),
            thing=rng.choice(THINGS), feeling=rng.choice(FEELINGS), weather=rng.choice(WEATHER)))
    return stories


def byte_token_batch(text: str, batch_size: int, seq_len: int) -> "torch.Tensor":
    """(batch_size, seq_len) token ids from consecutive windows of text's UTF-8 bytes (ids < 256)."""
    import torch

    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    need = batch_size * seq_len
    if len(data) < need:
        raise ValueError(f"text has {len(data)} bytes; need at least {need} for a {batch_size}x{seq_len} batch")
    return data[:need].view(batch_size, seq_len)
