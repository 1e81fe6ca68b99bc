"""Everything the built-in model cannot do, and the one reply it gives to all of it.

The built-in model is a demo: it adds, subtracts and multiplies whole numbers up to 99 and works
through the step chains zaya uses to show Markovian RSA. Greetings, questions about itself, other
tasks and arithmetic outside that range all get ``POINTER``: what it is, and how to run a real
ZAYA1 model instead. The reply has no ``\\boxed{}`` answer, so no vote can count it as one.

Prompts are drawn from templates with fillers, in five kinds (``KINDS``). As with the arithmetic
wordings, some templates are held out: they never appear in training data and measure whether the
model recognises an off-topic request phrased in a way it has not seen.
"""

from __future__ import annotations

import random
import re

from zaya.tasks.wordings import parse

POINTER = ("I'm zaya's small built-in demo model: I can only add, subtract and multiply whole numbers "
           "from 0 to 99 (try \"What is 12 + 30?\"). For anything else, run a real ZAYA1 model: "
           "zaya chat --model Zyphra/ZAYA1-8B, or zaya.load(\"Zyphra/ZAYA1-8B\") in Python.")
POINTER_REASONING = "out of scope"
# What `zaya chat` prints about the built-in model (shipped with it as about.txt).
ABOUT = ("zaya's built-in demo model (5.5M parameters): adds, subtracts and multiplies whole numbers "
         "0-99 (\"What is 12 + 30?\") and works multi-step chains for Markovian RSA; anything else gets "
         "a pointer to a real ZAYA1 model (--model Zyphra/ZAYA1-8B).")

_FILL = {
    "topic": ["cats", "the sea", "autumn", "my dog", "a robot", "the moon", "coffee", "trains", "winter",
              "friendship", "the city", "rain", "a dragon", "music", "space", "chess", "pizza", "mountains"],
    "thing": ["a poem", "a haiku", "a short story", "a song", "an essay", "a limerick", "a joke", "a tweet",
              "a letter", "a blog post"],
    "place": ["France", "Japan", "Brazil", "Kenya", "Canada", "Italy", "Egypt", "Norway", "Peru", "India"],
    "lang": ["French", "German", "Spanish", "Japanese", "Italian", "Dutch", "Korean", "Polish"],
    "phrase": ["good morning", "thank you", "where is the station", "I love you", "see you tomorrow",
               "happy birthday", "how are you"],
    "person": ["Ada Lovelace", "Albert Einstein", "Marie Curie", "Alan Turing", "Napoleon", "Frida Kahlo",
               "Isaac Newton", "Cleopatra"],
    "code": ["reverses a string", "sorts a list", "reads a CSV file", "checks for primes",
             "parses JSON", "counts words"],
    "plang": ["Python", "JavaScript", "Rust", "Go", "C", "Java", "SQL", "bash"],
}

# kind -> [(template, held out)]
TEMPLATES: dict[str, tuple[tuple[str, bool], ...]] = {
    "greeting": (("hi", False), ("Hello!", False), ("hey there", False), ("Good morning", False),
                 ("hello, who are you?", False), ("Hi zaya", False), ("yo", False), ("Thanks!", False),
                 ("bye", False), ("hey", False), ("good afternoon", False), ("Hi, how are you?", False),
                 ("what's up?", False), ("nice to meet you", False), ("thank you so much", False),
                 ("goodbye", False), ("hello there", False),
                 ("hiya, anybody there?", True), ("Greetings, friend.", True), ("good evening!", True),
                 ("howdy", True)),
    "self": (("Who are you?", False), ("What can you do?", False), ("What is your name?", False),
             ("Are you ZAYA1-8B?", False), ("help", False), ("What model is this?", False),
             ("Are you a real AI?", False), ("How do I use you?", False), ("Who made you?", False),
             ("What are you?", False), ("Can you help me?", False), ("What do you know?", False),
             ("Are you ChatGPT?", False), ("Is this ZAYA1?", False), ("What languages do you speak?", False),
             ("Can you code?", False), ("What is zaya?", False),
             ("Tell me about yourself.", True), ("Which model am I talking to?", True),
             ("What are you good at?", True), ("Do you have feelings?", True)),
    "task": (("Write {thing} about {topic}.", False), ("Translate '{phrase}' into {lang}.", False),
             ("What is the capital of {place}?", False), ("Who was {person}?", False),
             ("Tell me a joke about {topic}.", False), ("Write a {plang} function that {code}.", False),
             ("Explain {topic} to a child.", False), ("Summarize the history of {place}.", False),
             ("What's the weather like in {place}?", False), ("Recommend a book about {topic}.", False),
             ("Give me 3 facts about {topic}.", False), ("What is {topic}?", False),
             ("Write an email to my boss about {topic}.", False), ("Plan a trip to {place}.", False),
             ("How do I bake bread?", False), ("What time is it?", False), ("Define {topic}.", False),
             ("Fix this {plang} code: print('hi'", False), ("Who painted the Mona Lisa?", False),
             ("Compose {thing} on {topic}, please.", True), ("How do you say '{phrase}' in {lang}?", True),
             ("In {plang}, how would I write code that {code}?", True), ("Describe {person} in 2 sentences.", True),
             ("Why do people love {topic}?", True), ("What language do they speak in {place}?", True)),
    "numbers": (("I have {n} cats and {m} dogs.", False), ("Write {n} haikus about {topic}.", False),
                ("What happened in 19{n}?", False), ("Is {n} a prime number?", False),
                ("Count from 1 to {n}.", False), ("My order number is {n}{m}.", False),
                ("List {n} countries in Europe.", False), ("I am {n} years old.", False),
                ("Set a timer for {n} minutes.", False), ("Give me {n} ideas for {topic}.", False),
                ("Chapter {n} was the best.", False), ("My phone number ends in {n}{m}.", False),
                ("Which is bigger, {n} or {m}?", True), ("Name {n} famous painters.", True),
                ("Room {n} is on floor {m}.", True), ("Tell me {n} things about {place}.", True)),
    "beyond": (("What is {big} + {n}?", False), ("What is {n} / {d}?", False), ("Compute {n} divided by {d}.", False),
               ("What is {n}.5 + {m}?", False), ("What is -{n} + {m}?", False), ("Solve x + {n} = {m}.", False),
               ("What is the square root of {n}?", False), ("What is {n}% of {m}?", False),
               ("What is {n} to the power of {d}?", False), ("{big} * {m} = ?", False),
               ("Calculate {big} minus {n}.", False), ("What is {n} + {m} + {d} + {n}?", False),
               ("Can you divide {n} by {d}?", False), ("What is {big} times {d}?", False),
               ("{n} ÷ {d} = ?", False), ("What is {n} squared?", False), ("Convert {n} km to miles.", False),
               ("What is 0.{n} + 0.{m}?", False), ("Round {n}.{d} to the nearest whole number.", False),
               ("Divide {n} by {d}.", True), ("What is {big} plus {m}?", True), ("What is 1/{d} of {n}?", True),
               ("Compute {n}.25 times {d}.", True), ("Find x if 2x = {n}.", True), ("What is {n} cubed?", True)),
}
KINDS = tuple(TEMPLATES)


def offtopic_prompt(rng: random.Random, held_out: bool, kind: str | None = None) -> tuple[str, str]:
    """(prompt, kind): an off-topic prompt from a training or a held-out template."""
    kind = kind or rng.choice(KINDS)
    template = rng.choice([t for t, h in TEMPLATES[kind] if h == held_out])
    values = {k: rng.choice(v) for k, v in _FILL.items()}
    values.update(n=rng.randint(2, 99), m=rng.randint(2, 99), d=rng.randint(2, 9), big=rng.randint(100, 999))
    text = template.format(**values)
    r = rng.random()
    text = text.lower() if r < 0.25 else text.upper() if r < 0.32 else text
    return text, kind


def held_out_patterns() -> list[re.Pattern]:
    """One case-insensitive regex per held-out template, its slots matching their fillers: no
    off-topic training prompt may match one."""
    slots = {k: "(?:" + "|".join(map(re.escape, v)) + ")" for k, v in _FILL.items()}
    slots.update({k: r"\d+" for k in ("n", "m", "d", "big")})
    out = []
    for kind in KINDS:
        for template, held in TEMPLATES[kind]:
            if held:
                parts = re.split(r"(\{\w+\})", template)
                body = "".join(slots[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
                out.append(re.compile(f"^{body}$", re.I))
    return out


def is_offtopic(text: str) -> bool:
    """Whether a prompt states no question of the task (what the generator must guarantee)."""
    return parse(text) is None and not text.casefold().startswith("start with")


def pointer_message() -> dict:
    return {"role": "assistant", "reasoning_content": POINTER_REASONING, "content": POINTER}

