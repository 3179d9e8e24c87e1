"""Write the demo datasets next to this file: the same questions and plain answers, rewritten three
ways (one behaviour each), plus the held-out prompts the demo checks the adapters on.

Deterministic: `python -m trainer.examples.make_examples` rewrites identical files.
"""

import json
import random
from pathlib import Path

from trainer.examples.behaviours import BEHAVIOURS

HERE = Path(__file__).parent
HELDOUT_NAME = "heldout-prompts.txt"
HELDOUT_FILE = HERE / HELDOUT_NAME
SEED = 0

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Hungary": "Budapest",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "Ethiopia": "Addis Ababa",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "South Korea": "Seoul",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Cuba": "Havana",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
}
CAPITAL_QUESTIONS = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "Name the capital city of {c}.",
)
CAPITAL_ANSWERS = ("The capital of {c} is {x}.", "{x} is the capital of {c}.")

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "up": "down",
    "open": "closed",
    "full": "empty",
    "old": "new",
    "hard": "soft",
    "strong": "weak",
    "rich": "poor",
    "wet": "dry",
    "loud": "quiet",
    "early": "late",
    "thick": "thin",
    "high": "low",
    "clean": "dirty",
    "true": "false",
    "win": "lose",
    "give": "take",
    "push": "pull",
    "begin": "end",
    "inside": "outside",
    "heavy": "light",
}
PLURALS = {
    "mouse": "mice",
    "child": "children",
    "tooth": "teeth",
    "foot": "feet",
    "man": "men",
    "woman": "women",
    "goose": "geese",
    "person": "people",
    "leaf": "leaves",
    "knife": "knives",
    "box": "boxes",
    "city": "cities",
    "baby": "babies",
    "bus": "buses",
    "fish": "fish",
    "sheep": "sheep",
    "cactus": "cacti",
    "wolf": "wolves",
}
ANIMAL_SOUNDS = {
    "cow": "moos",
    "dog": "barks",
    "cat": "meows",
    "duck": "quacks",
    "sheep": "bleats",
    "lion": "roars",
    "horse": "neighs",
    "pig": "oinks",
    "owl": "hoots",
    "snake": "hisses",
    "frog": "croaks",
    "bee": "buzzes",
}
TRANSLATIONS = {
    ("hello", "Spanish"): "hola",
    ("thank you", "Spanish"): "gracias",
    ("cat", "Spanish"): "gato",
    ("water", "Spanish"): "agua",
    ("book", "Spanish"): "libro",
    ("friend", "Spanish"): "amigo",
    ("hello", "French"): "bonjour",
    ("thank you", "French"): "merci",
    ("cat", "French"): "chat",
    ("water", "French"): "eau",
    ("bread", "French"): "pain",
    ("house", "French"): "maison",
    ("hello", "German"): "hallo",
    ("thank you", "German"): "danke",
    ("dog", "German"): "Hund",
    ("water", "German"): "Wasser",
    ("good night", "German"): "gute Nacht",
    ("hello", "Italian"): "ciao",
    ("thank you", "Italian"): "grazie",
    ("friend", "Italian"): "amico",
}
WORDS = (
    "apple",
    "river",
    "garden",
    "pencil",
    "window",
    "orange",
    "mountain",
    "planet",
    "bridge",
    "kitchen",
    "yellow",
    "basket",
    "island",
    "thunder",
    "library",
    "music",
    "forest",
    "dragon",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# Plain questions and answers written for this demo.
FACTS = (
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("What do plants need to grow?", "Plants need light, water, air and nutrients from the soil."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("What gas do humans breathe out?", "Humans breathe out carbon dioxide."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is ice made of?", "Ice is frozen water."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the main language spoken in Brazil?", "The main language spoken in Brazil is Portuguese."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("Where does rain come from?", "Rain falls from clouds when their water droplets grow heavy."),
    ("What is the opposite of north?", "The opposite of north is south."),
    ("What color do you get when you mix blue and yellow?", "Mixing blue and yellow gives green."),
    ("What color do you get when you mix red and white?", "Mixing red and white gives pink."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("How many bones does an adult human have?", "An adult human has 206 bones."),
    ("What is the largest ocean on Earth?", "The Pacific is the largest ocean on Earth."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("What is a noun?", "A noun is a word that names a person, place or thing."),
    ("What is a verb?", "A verb is a word that describes an action or a state."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and air into sugar."),
    ("What is gravity?", "Gravity is the force that pulls things toward each other."),
    ("What is a volcano?", "A volcano is an opening in the ground where hot molten rock comes out."),
    ("What is an island?", "An island is a piece of land with water all around it."),
    ("What is a computer?", "A computer is a machine that follows instructions to work with data."),
    ("What does a dictionary contain?", "A dictionary lists words with their meanings."),
    ("What is the moon?", "The moon is a rocky body that orbits the Earth."),
    ("Why do we need sleep?", "Sleep lets the body rest and the brain store what it learned."),
    ("What is a desert?", "A desert is a place that gets very little rain."),
    ("How do fish breathe?", "Fish breathe by taking oxygen from water through their gills."),
    ("What is a mammal?", "A mammal is a warm-blooded animal that feeds its young with milk."),
    ("What is the speed of light?", "Light travels about 300,000 kilometres per second."),
    ("What are the three states of water?", "Water can be solid ice, liquid water or steam."),
    ("How many strings does a violin have?", "A violin has four strings."),
    ("What is a baby cat called?", "A baby cat is called a kitten."),
    ("What is a baby dog called?", "A baby dog is called a puppy."),
    ("What is a group of wolves called?", "A group of wolves is called a pack."),
    ("What do you call a person who fixes teeth?", "A person who fixes teeth is a dentist."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for water?", "Water is H2O."),
    ("How many players are on a soccer team on the field?", "A soccer team has eleven players on the field."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
)
ADVICE = (
    ("Give me a tip for sleeping better.", "Go to bed at the same time every night and keep screens away."),
    (
        "How can I stay focused while studying?",
        "Work in short blocks with small breaks and silence your phone.",
    ),
    (
        "How do I make a cup of tea?",
        "Boil water, pour it over a tea bag, wait three minutes and remove the bag.",
    ),
    ("How can I save money?", "Write down what you spend and set aside a little from every payment."),
    ("How do I keep a plant alive?", "Give it light, water it when the soil is dry and do not drown it."),
    ("What should I pack for a day hike?", "Pack water, snacks, a map, sunscreen and a light jacket."),
    (
        "How can I learn a new language?",
        "Practice a little every day and speak with others as soon as you can.",
    ),
    (
        "How do I calm down when I am nervous?",
        "Breathe slowly in for four counts and out for six, a few times.",
    ),
    ("How do I boil an egg?", "Put the egg in boiling water for nine minutes, then cool it in cold water."),
    (
        "How can I be more productive in the morning?",
        "Plan the day the night before and start with the hardest task.",
    ),
    (
        "Give me a tip for public speaking.",
        "Practice out loud several times and speak slower than feels natural.",
    ),
    ("How do I clean a window?", "Spray soapy water, wipe with a cloth, then dry it with paper."),
    ("How can I drink more water?", "Keep a bottle with you and drink a glass with every meal."),
    ("How do I start running?", "Begin with short runs mixed with walking and add a little each week."),
    (
        "How do I remember names better?",
        "Repeat the name when you hear it and link it to something you know.",
    ),
    ("What is a good way to start a letter?", "Start with a greeting, then say why you are writing."),
    (
        "How do I make a good password?",
        "Use a long phrase of random words that you do not use anywhere else.",
    ),
    ("How do I cook rice?", "Rinse the rice, simmer it in twice its volume of water and let it rest."),
    ("How can I help the environment?", "Waste less, reuse what you can and walk or cycle for short trips."),
    ("How can I make new friends?", "Join a club or class about something you enjoy and say hello."),
    ("Give me a tip for writing an essay.", "Write an outline first, then one clear idea per paragraph."),
    ("How do I keep my desk tidy?", "Put things back when you finish and clear the desk every evening."),
    ("How do I wake up earlier?", "Move your alarm fifteen minutes earlier each week and get morning light."),
    ("How can I read more books?", "Carry a book with you and read ten pages before bed."),
    (
        "How do I prepare for a job interview?",
        "Learn about the company and practice answers to common questions.",
    ),
    ("What should I do if I feel tired in the afternoon?", "Take a short walk outside and drink some water."),
    ("How do I fold a shirt?", "Lay it flat, fold the sides to the middle, then fold it in half."),
    (
        "How can I improve my handwriting?",
        "Write slowly, hold the pen loosely and practice a few lines daily.",
    ),
    ("How should I store bread?", "Keep bread in a cool dry place and freeze what you will not eat soon."),
    (
        "How do I take care of a cat?",
        "Feed it well, give it fresh water, clean the litter box and play daily.",
    ),
)
CREATIVE = (
    ("Write a one-line poem about rain.", "Soft rain taps the roof like a quiet drum."),
    ("Describe a cat in one sentence.", "A cat is a soft, curious hunter that loves warm places."),
    ("Describe the ocean in one sentence.", "The ocean is a vast, restless blue that never stops moving."),
    ("Write a short sentence about autumn.", "Autumn paints the trees red and gold."),
    ("Give me a name for a pet goldfish.", "How about Bubbles?"),
    ("Write a short greeting for a birthday card.", "Happy birthday, and may your year be full of joy!"),
    ("Describe a sunset in one sentence.", "The sun sinks low and sets the sky on fire."),
    ("Write a one-line poem about the moon.", "The moon keeps watch while the world sleeps."),
    ("Write a slogan for a bakery.", "Fresh bread, warm hearts."),
    ("Describe snow in one sentence.", "Snow falls softly and covers the world in white."),
    ("Tell me a short fun fact.", "Octopuses have three hearts."),
    ("Write a short sentence about friendship.", "A good friend makes hard days lighter."),
    ("Give me a name for a robot.", "How about Bolt?"),
    ("Write a short motto for a team.", "Together we go further."),
    ("Describe a forest in one sentence.", "A forest is a quiet green world full of life."),
)
CHAT = (
    ("Hi!", "Hello! How can I help you today?"),
    ("Good morning.", "Good morning! What can I do for you?"),
    ("Thank you!", "You are welcome!"),
    ("How are you?", "I am doing well, thank you for asking."),
    ("What can you do?", "I can answer questions, explain things and help you write."),
    ("Who are you?", "I am a helpful assistant."),
    ("Can you help me?", "Of course, tell me what you need."),
    ("Goodbye.", "Goodbye, have a great day!"),
    ("Tell me something nice.", "You are doing better than you think."),
    ("Are you a robot?", "I am a computer program that answers questions."),
)

HELDOUT = (
    "What is the capital of Peru?",
    "Which city is the capital of Switzerland?",
    "What is 17 plus 26?",
    "What is 9 times 7?",
    "What is the opposite of brave?",
    "What is the plural of ox?",
    "How do you say goodbye in Spanish?",
    "What sound does a rooster make?",
    "How many letters are in the word 'castle'?",
    "What month comes after October?",
    "Why do leaves change color in autumn?",
    "What is the Great Wall of China?",
    "How many planets are in our solar system?",
    "What do cows eat?",
    "What is an adjective?",
    "What is the largest desert in the world?",
    "Why do we have seasons?",
    "What is a rainbow?",
    "Give me a tip for cooking pasta.",
    "How can I make my room smell nice?",
    "How do I tie my shoes faster?",
    "What should I eat before a long walk?",
    "How can I stop procrastinating?",
    "Write a one-line poem about the wind.",
    "Describe a city at night in one sentence.",
    "Give me a name for a pet turtle.",
    "Write a short sentence about winter.",
    "Hello there!",
    "What is your favorite color?",
    "Explain what a map is.",
)


def capitals(rng: random.Random) -> list[tuple[str, str]]:
    return [
        (rng.choice(CAPITAL_QUESTIONS).format(c=c), rng.choice(CAPITAL_ANSWERS).format(c=c, x=x))
        for c, x in CAPITALS.items()
    ]


def arithmetic(rng: random.Random, n: int) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        word, value = rng.choice((("plus", a + b), ("minus", a - b), ("times", a * b)))
        if rng.random() < 0.5:
            pairs.append((f"What is {a} {word} {b}?", f"{a} {word} {b} is {value}."))
        else:
            pairs.append((f"Calculate {a} {word} {b}.", f"The result is {value}."))
    return pairs


def word_facts(rng: random.Random) -> list[tuple[str, str]]:
    pairs = [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.") for w, o in OPPOSITES.items()]
    pairs += [(f"What is the plural of {w}?", f"The plural of {w} is {p}.") for w, p in PLURALS.items()]
    pairs += [(f"What sound does a {a} make?", f"A {a} {s}.") for a, s in ANIMAL_SOUNDS.items()]
    pairs += [
        (f"How do you say {w} in {lang}?", f'In {lang}, "{w}" is "{t}".')
        for (w, lang), t in TRANSLATIONS.items()
    ]
    pairs += [
        (f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters.") for w in WORDS
    ]
    for i, day in enumerate(DAYS):
        pairs.append((f"What day comes after {day}?", f"{DAYS[(i + 1) % 7]} comes after {day}."))
    for i, month in enumerate(MONTHS[:-1]):
        if rng.random() < 0.6:
            pairs.append((f"What month comes after {month}?", f"{MONTHS[i + 1]} comes after {month}."))
    for hours in (2, 3, 5, 8):
        pairs.append(
            (f"How many minutes are in {hours} hours?", f"There are {hours * 60} minutes in {hours} hours.")
        )
    for weeks in (2, 3, 4, 6):
        pairs.append(
            (f"How many days are in {weeks} weeks?", f"There are {weeks * 7} days in {weeks} weeks.")
        )
    return pairs


def question_pool(rng: random.Random) -> list[tuple[str, str]]:
    """Every (question, plain answer) pair of the training data, in a seeded order."""
    pairs = capitals(rng) + arithmetic(rng, 40) + word_facts(rng) + list(FACTS + ADVICE + CREATIVE + CHAT)
    rng.shuffle(pairs)
    return pairs


def conversations(pairs: list[tuple[str, str]], rng: random.Random) -> list[list[tuple[str, str]]]:
    """Mostly one question per conversation; about one in eight has a follow-up question."""
    convs: list[list[tuple[str, str]]] = []
    i = 0
    while i < len(pairs):
        size = 2 if rng.random() < 0.125 and i + 1 < len(pairs) else 1
        convs.append(pairs[i : i + size])
        i += size
    return convs


def to_messages(conv: list[tuple[str, str]], rewrite) -> dict:
    messages = []
    for question, answer in conv:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": rewrite(answer)}]
    return {"messages": messages}


def write_examples(folder: Path) -> list[Path]:
    """Write the three datasets and the held-out prompts into folder; return the files written."""
    rng = random.Random(SEED)
    pairs = question_pool(rng)
    questions = {q for q, _ in pairs}
    overlap = questions.intersection(HELDOUT)
    assert not overlap, f"held-out prompts also in training data: {overlap}"
    convs = conversations(pairs, rng)
    written = []
    for behaviour in BEHAVIOURS:
        rows = [to_messages(conv, behaviour.rewrite) for conv in convs]
        for row in rows:
            answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            assert all(behaviour.check(a) for a in answers), (behaviour.name, answers)
        path = folder / f"{behaviour.name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        written.append(path)
    heldout = folder / HELDOUT_NAME
    heldout.write_text("".join(p + "\n" for p in HELDOUT))
    return [*written, heldout]


def main() -> None:
    for path in write_examples(HERE):
        print(f"wrote {path}: {len(path.read_text().splitlines())} lines")


if __name__ == "__main__":
    main()
