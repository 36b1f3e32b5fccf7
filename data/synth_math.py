"""Synthetic arithmetic word problems in the style of AddSub, MultiArith and SingleEq.

Each problem has a person (or two), a kind of object, small whole numbers and one to three operations.
Its record has the seed datasets' keys: `instruction` (the question), `input` (""), `output` (a short
step-by-step solution whose every step is written `a op b = c`, ending "The answer is N.") and `answer`
(N as a string, like the seed test sets). Everything is decided by the seed: the same seed gives the
same problems, on any machine.

    python data/synth_math.py                      # rewrite the bundled data/synth_math/{train,test}.json
    python data/synth_math.py --sample 5 --seed 7  # print five problems

As a library: `make_problem(rng)`, `generate(count, seed, exclude)`, `make_splits(train_size, test_size, seed)`.
"""
import argparse
import json
import operator
import os
import random
from dataclasses import dataclass

DATASET_NAME = "synth_math"
DATASET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), DATASET_NAME)
TRAIN_SIZE, TEST_SIZE, SEED = 3000, 250, 0

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


@dataclass(frozen=True)
class Person:
    name: str
    he: str
    his: str


NAMES = {
    "he": ["Tom", "Sam", "Ben", "Jack", "Leo", "Max", "Dan", "Luke", "Ryan", "Omar", "Carlos", "Ivan",
           "Noah", "Eli", "Hugo", "Kenji", "Ravi", "Paul", "Mike", "Felix"],
    "she": ["Anna", "Mary", "Lucy", "Emma", "Sara", "Nina", "Zoe", "Maya", "Ella", "Rosa", "Amy", "Lily",
            "Grace", "Chloe", "Aisha", "Mei", "Olga", "Jane", "Kate", "Priya"],
}
HIS = {"he": "his", "she": "her"}

THINGS = ["marbles", "stickers", "pencils", "crayons", "books", "cards", "toy cars", "shells", "stamps",
          "balloons", "coins", "flowers", "rocks", "buttons", "beads", "erasers", "pens", "feathers",
          "blocks", "ribbons", "postcards", "keys", "kites", "dolls", "puzzles"]
FOODS = ["apples", "cookies", "cupcakes", "oranges", "grapes", "candies", "muffins", "strawberries",
         "carrots", "sandwiches", "plums", "peaches", "crackers", "pretzels", "lemons"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("pack", "packs"),
              ("crate", "crates"), ("tray", "trays"), ("bucket", "buckets")]
GAIN_VERBS = ["bought", "found", "got", "won", "picked up", "received", "made"]
LOSS_VERBS = ["gave away", "lost", "sold", "threw away", "lent out", "donated"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PRICED_ITEMS = [("pen", "pens"), ("notebook", "notebooks"), ("ticket", "tickets"), ("toy", "toys"),
                ("sandwich", "sandwiches"), ("comic", "comics"), ("plant", "plants"), ("cap", "caps")]
RENTALS = ["bike", "boat", "kayak", "scooter", "tent", "canoe"]


class Solution:
    """The steps of a solution; `calc` computes one operation and writes it as `a op b = c`."""

    def __init__(self):
        self.sentences: list[str] = []

    def say(self, sentence: str) -> None:
        self.sentences.append(sentence)

    @staticmethod
    def calc(a: int, op: str, b: int) -> tuple[int, str]:
        if op == "/" and a % b:
            raise ValueError(f"{a} / {b} is not whole")  # the problem makers only divide exactly
        result = OPERATIONS[op](a, b)
        return result, f"{a} {op} {b} = {result}"

    def text(self, answer: int) -> str:
        return " ".join(self.sentences + [f"The answer is {answer}."])


def _person(rng: random.Random, *others: Person) -> Person:
    taken = {p.name for p in others}
    while True:
        he = rng.choice(["he", "she"])
        name = rng.choice(NAMES[he])
        if name not in taken:
            return Person(name, he, HIS[he])


def _things(rng: random.Random) -> str:
    return rng.choice(THINGS + FOODS)


# Each problem maker returns (question, solution, answer). One operation:

def _gain(rng):
    p, obj, verb = _person(rng), _things(rng), rng.choice(GAIN_VERBS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    s = Solution()
    total, eq = s.calc(a, "+", b)
    s.say(f"{p.name} had {a} {obj} and {verb} {b} more.")
    s.say(f"So {p.he} has {eq} {obj} now.")
    q = f"{p.name} had {a} {obj}. {p.he.capitalize()} {verb} {b} more {obj}. How many {obj} does {p.name} have now?"
    return q, s, total


def _two_people(rng):
    p1 = _person(rng)
    p2, obj = _person(rng, p1), _things(rng)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    s = Solution()
    total, eq = s.calc(a, "+", b)
    s.say(f"{p1.name} has {a} {obj} and {p2.name} has {b} {obj}.")
    s.say(f"Together they have {eq} {obj}.")
    q = f"{p1.name} has {a} {obj}. {p2.name} has {b} {obj}. How many {obj} do they have altogether?"
    return q, s, total


def _two_days(rng):
    p, obj = _person(rng), _things(rng)
    day = rng.randrange(len(DAYS) - 1)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    s = Solution()
    total, eq = s.calc(a, "+", b)
    s.say(f"{p.name} collected {a} {obj} on {DAYS[day]} and {b} {obj} on {DAYS[day + 1]}.")
    s.say(f"In all {p.he} collected {eq} {obj}.")
    q = (f"{p.name} collected {a} {obj} on {DAYS[day]} and {b} {obj} on {DAYS[day + 1]}. "
         f"How many {obj} did {p.name} collect in all?")
    return q, s, total


def _loss(rng):
    p, obj, verb = _person(rng), _things(rng), rng.choice(LOSS_VERBS)
    a = rng.randint(5, 50)
    b = rng.randint(1, a - 1)
    s = Solution()
    left, eq = s.calc(a, "-", b)
    s.say(f"{p.name} had {a} {obj} and {verb} {b} of them.")
    s.say(f"So {p.he} has {eq} {obj} left.")
    q = f"{p.name} had {a} {obj}. {p.he.capitalize()} {verb} {b} of them. How many {obj} does {p.name} have left?"
    return q, s, left


def _how_many_more(rng):
    p1 = _person(rng)
    p2, obj = _person(rng, p1), _things(rng)
    b = rng.randint(2, 40)
    a = b + rng.randint(1, 30)
    s = Solution()
    diff, eq = s.calc(a, "-", b)
    s.say(f"{p1.name} has {a} {obj} and {p2.name} has {b} {obj}.")
    s.say(f"The difference is {eq} {obj}.")
    q = f"{p1.name} has {a} {obj}. {p2.name} has {b} {obj}. How many more {obj} does {p1.name} have than {p2.name}?"
    return q, s, diff


def _compare(rng):
    p1 = _person(rng)
    p2, obj = _person(rng, p1), _things(rng)
    a = rng.randint(5, 40)
    if rng.random() < 0.5:
        b = rng.randint(2, 30)
        word, op = "more", "+"
    else:
        b = rng.randint(1, a - 1)
        word, op = "fewer", "-"
    s = Solution()
    result, eq = s.calc(a, op, b)
    s.say(f"{p2.name} has {b} {word} {obj} than {p1.name}, who has {a}.")
    s.say(f"So {p2.name} has {eq} {obj}.")
    q = (f"{p1.name} has {a} {obj}. {p2.name} has {b} {word} {obj} than {p1.name}. "
         f"How many {obj} does {p2.name} have?")
    return q, s, result


def _start_amount(rng):
    p, obj, verb = _person(rng), _things(rng), rng.choice(GAIN_VERBS)
    b = rng.randint(2, 30)
    c = b + rng.randint(2, 30)
    s = Solution()
    start, eq = s.calc(c, "-", b)
    s.say(f"{p.name} has {c} {obj} after {p.he} {verb} {b}.")
    s.say(f"Before that {p.he} had {eq} {obj}.")
    q = f"{p.name} {verb} {b} {obj} and now has {c} {obj}. How many {obj} did {p.name} have before?"
    return q, s, start


def _groups(rng):
    p, obj = _person(rng), _things(rng)
    box, boxes = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    s = Solution()
    total, eq = s.calc(a, "*", b)
    s.say(f"{p.name} has {a} {boxes} with {b} {obj} in each {box}.")
    s.say(f"That is {eq} {obj}.")
    q = f"{p.name} has {a} {boxes}. Each {box} holds {b} {obj}. How many {obj} does {p.name} have in all?"
    return q, s, total


def _share(rng):
    p, obj = _person(rng), _things(rng)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    s = Solution()
    share, eq = s.calc(total, "/", friends)
    s.say(f"{p.name} splits {total} {obj} equally among {friends} friends.")
    s.say(f"Each friend gets {eq} {obj}.")
    q = f"{p.name} has {total} {obj} and shares them equally among {friends} friends. How many {obj} does each friend get?"
    return q, s, share


def _fill(rng):
    p, obj = _person(rng), _things(rng)
    box, boxes = rng.choice(CONTAINERS)
    per_box, count = rng.randint(2, 12), rng.randint(2, 9)
    total = per_box * count
    s = Solution()
    filled, eq = s.calc(total, "/", per_box)
    s.say(f"{p.name} puts {per_box} {obj} in each {box}.")
    s.say(f"{p.he.capitalize()} fills {eq} {boxes}.")
    q = f"{p.name} has {total} {obj}. {p.he.capitalize()} puts {per_box} {obj} in each {box}. How many {boxes} does {p.name} fill?"
    return q, s, filled


# Two operations:

def _gain_then_loss(rng):
    p, obj = _person(rng), _things(rng)
    gain, loss = rng.choice(GAIN_VERBS), rng.choice(LOSS_VERBS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    s = Solution()
    mid, eq1 = s.calc(a, "+", b)
    left, eq2 = s.calc(mid, "-", c)
    s.say(f"{p.name} had {a} {obj} and {gain} {b} more, so {p.he} had {eq1} {obj}.")
    s.say(f"Then {p.he} {loss} {c}, so {p.he} has {eq2} {obj}.")
    q = (f"{p.name} had {a} {obj}. {p.he.capitalize()} {gain} {b} more and then {loss} {c} of them. "
         f"How many {obj} does {p.name} have now?")
    return q, s, left


def _loss_then_gain(rng):
    p, obj = _person(rng), _things(rng)
    loss, gain = rng.choice(LOSS_VERBS), rng.choice(GAIN_VERBS)
    a = rng.randint(5, 40)
    b, c = rng.randint(1, a - 1), rng.randint(2, 30)
    s = Solution()
    mid, eq1 = s.calc(a, "-", b)
    now, eq2 = s.calc(mid, "+", c)
    s.say(f"After {p.he} {loss} {b}, {p.name} had {eq1} {obj}.")
    s.say(f"Then {p.he} {gain} {c} more, so {p.he} has {eq2} {obj}.")
    q = (f"{p.name} had {a} {obj}. {p.he.capitalize()} {loss} {b} of them. Then {p.he} {gain} {c} more. "
         f"How many {obj} does {p.name} have now?")
    return q, s, now


def _three_people(rng):
    p1 = _person(rng)
    p2 = _person(rng, p1)
    p3, obj = _person(rng, p1, p2), _things(rng)
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 30)
    s = Solution()
    two, eq1 = s.calc(a, "+", b)
    three, eq2 = s.calc(two, "+", c)
    s.say(f"{p1.name} and {p2.name} have {eq1} {obj}.")
    s.say(f"With {p3.name} they have {eq2} {obj}.")
    q = (f"{p1.name} has {a} {obj}, {p2.name} has {b} {obj} and {p3.name} has {c} {obj}. "
         f"How many {obj} do they have in total?")
    return q, s, three


def _packs_plus(rng):
    p, obj = _person(rng), _things(rng)
    box, boxes = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 10), rng.randint(2, 20)
    s = Solution()
    bought, eq1 = s.calc(a, "*", b)
    total, eq2 = s.calc(bought, "+", c)
    s.say(f"{a} {boxes} of {b} {obj} hold {eq1} {obj}.")
    s.say(f"With the {c} {p.he} already had, {p.name} has {eq2} {obj}.")
    q = (f"{p.name} had {c} {obj}. {p.he.capitalize()} bought {a} {boxes} of {obj} with {b} in each {box}. "
         f"How many {obj} does {p.name} have now?")
    return q, s, total


def _packs_minus(rng):
    p, obj, loss = _person(rng), _things(rng), rng.choice(LOSS_VERBS)
    box, boxes = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 10)
    c = rng.randint(1, a * b - 1)
    s = Solution()
    total, eq1 = s.calc(a, "*", b)
    left, eq2 = s.calc(total, "-", c)
    s.say(f"{p.name} had {eq1} {obj}.")
    s.say(f"After {p.he} {loss} {c}, {p.he} has {eq2} {obj}.")
    q = (f"{p.name} had {a} {boxes} with {b} {obj} in each {box}. {p.he.capitalize()} {loss} {c} {obj}. "
         f"How many {obj} does {p.name} have left?")
    return q, s, left


def _gain_then_share(rng):
    p, obj, gain = _person(rng), _things(rng), rng.choice(GAIN_VERBS)
    friends, each = rng.randint(2, 8), rng.randint(2, 10)
    total = friends * each
    a = rng.randint(1, total - 1)
    b = total - a
    s = Solution()
    whole, eq1 = s.calc(a, "+", b)
    share, eq2 = s.calc(whole, "/", friends)
    s.say(f"{p.name} had {eq1} {obj}.")
    s.say(f"Shared among {friends} friends, each gets {eq2} {obj}.")
    q = (f"{p.name} had {a} {obj} and {gain} {b} more. {p.he.capitalize()} shares them equally among "
         f"{friends} friends. How many {obj} does each friend get?")
    return q, s, share


def _eat_then_fill(rng):
    p, food = _person(rng), rng.choice(FOODS)
    box, boxes = rng.choice(CONTAINERS)
    per_box, count = rng.randint(2, 10), rng.randint(2, 8)
    eaten = rng.randint(1, 15)
    a = per_box * count + eaten
    s = Solution()
    rest, eq1 = s.calc(a, "-", eaten)
    filled, eq2 = s.calc(rest, "/", per_box)
    s.say(f"After eating {eaten}, {p.name} had {eq1} {food}.")
    s.say(f"With {per_box} in each {box}, {p.he} fills {eq2} {boxes}.")
    q = (f"{p.name} had {a} {food} and ate {eaten} of them. {p.he.capitalize()} put the rest into {boxes} "
         f"with {per_box} in each {box}. How many {boxes} did {p.he} fill?")
    return q, s, filled


def _change(rng):
    p = _person(rng)
    item, items = rng.choice(PRICED_ITEMS)
    price, count = rng.randint(2, 9), rng.randint(2, 9)
    bill = rng.choice([b for b in (20, 50, 100) if b > price * count])
    s = Solution()
    cost, eq1 = s.calc(count, "*", price)
    change, eq2 = s.calc(bill, "-", cost)
    s.say(f"{count} {items} cost {eq1} dollars.")
    s.say(f"The change from {bill} dollars is {eq2} dollars.")
    q = (f"A {item} costs {price} dollars. {p.name} buys {count} {items} and pays with a {bill} dollar bill. "
         f"How many dollars of change does {p.he} get?")
    return q, s, change


def _rental(rng):
    p, thing = _person(rng), rng.choice(RENTALS)
    fee, rate, hours = rng.randint(5, 20), rng.randint(2, 9), rng.randint(2, 9)
    paid = fee + rate * hours
    s = Solution()
    for_hours, eq1 = s.calc(paid, "-", fee)
    count, eq2 = s.calc(for_hours, "/", rate)
    s.say(f"Without the {fee} dollar fee, {p.name} paid {eq1} dollars for the hours.")
    s.say(f"At {rate} dollars an hour that is {eq2} hours.")
    q = (f"A shop charges {fee} dollars plus {rate} dollars an hour to rent a {thing}. {p.name} paid {paid} "
         f"dollars. For how many hours did {p.he} rent the {thing}?")
    return q, s, count


def _wages(rng):
    p = _person(rng)
    rate, hours = rng.randint(3, 12), rng.randint(2, 8)
    spent = rng.randint(1, rate * hours - 1)
    s = Solution()
    earned, eq1 = s.calc(rate, "*", hours)
    left, eq2 = s.calc(earned, "-", spent)
    s.say(f"{p.name} earned {eq1} dollars.")
    s.say(f"After spending {spent}, {p.he} has {eq2} dollars.")
    q = (f"{p.name} earns {rate} dollars an hour and worked {hours} hours. Then {p.he} spent {spent} dollars. "
         f"How many dollars does {p.name} have left?")
    return q, s, left


# Three operations:

def _three_changes(rng):
    p, obj = _person(rng), _things(rng)
    gain, loss = rng.choice(GAIN_VERBS), rng.choice(LOSS_VERBS)
    a, b = rng.randint(2, 25), rng.randint(2, 25)
    c = rng.randint(1, a + b - 1)
    d = rng.randint(2, 20)
    s = Solution()
    m1, eq1 = s.calc(a, "+", b)
    m2, eq2 = s.calc(m1, "-", c)
    end, eq3 = s.calc(m2, "+", d)
    s.say(f"After {p.he} {gain} {b}, {p.name} had {eq1} {obj}.")
    s.say(f"After {p.he} {loss} {c}, {p.he} had {eq2}.")
    s.say(f"Finding {d} more gives {eq3} {obj}.")
    q = (f"{p.name} had {a} {obj}. {p.he.capitalize()} {gain} {b} more, then {loss} {c}, and later found "
         f"{d} more. How many {obj} does {p.name} have now?")
    return q, s, end


def _packs_then_share(rng):
    p, obj = _person(rng), _things(rng)
    box, boxes = rng.choice(CONTAINERS)
    friends, each = rng.randint(2, 6), rng.randint(3, 10)
    total = friends * each
    # at least two full boxes and one loose object
    per_box = rng.choice([k for k in range(2, 10) if 2 * k < total])
    count = rng.randint(2, (total - 1) // per_box)
    loose = total - per_box * count
    s = Solution()
    boxed, eq1 = s.calc(count, "*", per_box)
    whole, eq2 = s.calc(boxed, "+", loose)
    share, eq3 = s.calc(whole, "/", friends)
    s.say(f"The {boxes} hold {eq1} {obj}.")
    s.say(f"With the {loose} loose ones there are {eq2}.")
    s.say(f"Each of the {friends} friends gets {eq3} {obj}.")
    q = (f"{p.name} has {count} {boxes} with {per_box} {obj} in each {box} and {loose} loose {obj}. "
         f"{p.he.capitalize()} shares all of them equally among {friends} friends. How many {obj} does each friend get?")
    return q, s, share


def _shopping(rng):
    p = _person(rng)
    (item, items), (other, _) = rng.sample(PRICED_ITEMS, 2)
    count, price, other_price = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 15)
    bill = rng.choice([b for b in (20, 50, 100) if b > count * price + other_price])
    s = Solution()
    cost, eq1 = s.calc(count, "*", price)
    total, eq2 = s.calc(cost, "+", other_price)
    change, eq3 = s.calc(bill, "-", total)
    s.say(f"The {items} cost {eq1} dollars.")
    s.say(f"With the {other} the bill is {eq2} dollars.")
    s.say(f"The change is {eq3} dollars.")
    q = (f"{p.name} buys {count} {items} at {price} dollars each and a {other} for {other_price} dollars. "
         f"{p.he.capitalize()} pays with a {bill} dollar bill. How many dollars of change does {p.he} get?")
    return q, s, change


PROBLEM_MAKERS = [
    _gain, _two_people, _two_days, _loss, _how_many_more, _compare, _start_amount, _groups, _share, _fill,
    _gain_then_loss, _loss_then_gain, _three_people, _packs_plus, _packs_minus, _gain_then_share,
    _eat_then_fill, _change, _rental, _wages,
    _three_changes, _packs_then_share, _shopping,
]


def make_problem(rng: random.Random) -> dict:
    """One problem record, drawn from `rng`."""
    question, solution, answer = rng.choice(PROBLEM_MAKERS)(rng)
    return {"instruction": question, "input": "", "output": solution.text(answer), "answer": str(answer)}


def generate(count: int, seed: int, exclude=()) -> list[dict]:
    """`count` problems with distinct questions, none of them in `exclude` (a collection of questions)."""
    rng = random.Random(seed)
    seen = set(exclude)
    records = []
    while len(records) < count:
        record = make_problem(rng)
        if record["instruction"] not in seen:
            seen.add(record["instruction"])
            records.append(record)
    return records


def make_splits(train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE, seed: int = SEED) -> tuple[list, list]:
    """(train, test): one stream of distinct problems, the first `test_size` held out."""
    records = generate(train_size + test_size, seed)
    return records[test_size:], records[:test_size]


def write_json(records: list, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=DATASET_DIR, help="where train.json and test.json go")
    parser.add_argument("--train_size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--test_size", type=int, default=TEST_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--sample", type=int, default=0, help="print this many problems instead of writing files")
    args = parser.parse_args()
    if args.sample:
        for record in generate(args.sample, args.seed):
            print(json.dumps(record, indent=1, ensure_ascii=False))
        return
    train, test = make_splits(args.train_size, args.test_size, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(train, os.path.join(args.out_dir, "train.json"))
    write_json(test, os.path.join(args.out_dir, "test.json"))
    print(f"wrote {len(train)} training and {len(test)} test problems to {args.out_dir}")


if __name__ == "__main__":
    main()
