"""Training text for distillation: the shipped corpus, or tens of thousands of e-commerce queries and titles
generated from its vocabulary, with every held-out text (the eval sets' queries and titles, the parity texts) left out.

Why generate: the shipped corpus has ~1,200 texts, too few for a pruned student to learn where the teacher puts
near-duplicates and matching queries. Why only the shipped corpus's product phrases plus invented brands, attributes
and model numbers: typed.json's brands and model numbers *are* its lexical queries, so using them would train on
the eval. A generated text whose normalised form equals a held-out text's is dropped as well, whatever produced it.

Texts come in families: a product's sibling titles (same brand and product, another model number or capacity) then
queries for it, so a contiguous training batch holds the near-duplicates and matching queries the in-batch ranking
term learns from. One seeded stream draws them in order, so the first m texts are the same for every n ≥ m."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ecomserve.evaluation import load_typed_eval_set
from ecomserve.paths import corpus_lines, parity_texts
from ecomserve.spec import DistillSpec

DEFAULT_SIZE = 40_000
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 2, 8

# Invented brands (none in the eval sets), so no real product and no eval brand is implied.
BRANDS = ("Aldercrest", "Brimvale", "Caskora", "Dunmere", "Elswick", "Fjordan", "Glenrook", "Harlow & Pike")
BRANDS += ("Isarno", "Kestrel Bay", "Lindqvist", "Mossgrove", "Nettlefield", "Orvane", "Pellinor", "Quarrydale")
BRANDS += ("Ravelle", "Sablewood", "Tamberly", "Valdera", "Westhollow", "Yarrowby", "Zephyrine", "Coppervale")
BRANDS += ("Ashford Lane", "Bramblecot", "Cindral", "Driftmark", "Hollis & Reed", "Marrowind")
COLOURS = ("Black", "White", "Grey", "Navy", "Red", "Blue", "Green", "Pink", "Beige", "Brown", "Silver", "Gold")
COLOURS += ("Rose Gold", "Olive", "Teal", "Burgundy", "Charcoal", "Cream", "Purple", "Yellow", "Orange", "Clear")
MATERIALS = ("Stainless Steel", "Bamboo", "Silicone", "Leather", "Cotton", "Wool", "Glass", "Ceramic", "Aluminium")
MATERIALS += ("Oak", "Linen", "Nylon", "Polyester", "Cast Iron", "Recycled Plastic", "Walnut", "Canvas", "Memory Foam")
PACKS = (2, 3, 4, 5, 6, 8, 10, 12, 20, 24, 50)
AUDIENCES = ("kids", "men", "women", "travel", "camping", "office", "home", "gym", "beginners", "students", "seniors")
MODEL_SUFFIXES = ("", "", "X", "S", "Pro", "Max", "Plus", "Mini", "II", "Lite", "Ultra")

# Attribute values by product kind: a head word picks the kinds that fit ("bottle" → volumes), so generated titles
# read like listings; siblings differ in one of these, as typed.json's near-duplicates do.
_UNITS: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (
        frozenset({"ssd", "drive", "usb", "flash", "card", "phone", "smartphone", "tablet", "laptop", "console"}),
        ("32GB", "64GB", "128GB", "256GB", "512GB", "1TB", "2TB", "4TB"),
    ),
    (frozenset({"bank", "battery", "batteries"}), ("5000mAh", "10000mAh", "20000mAh", "26800mAh", "AA", "AAA")),
    (frozenset({"charger", "adapter", "supply"}), ("20W", "30W", "45W", "65W", "100W", "140W")),
    (
        frozenset({"bottle", "tumbler", "mug", "flask", "cup", "thermos", "jar", "pitcher", "carafe", "kettle"}),
        ("350ml", "500ml", "750ml", "1L", "1.5L", "12 oz", "20 oz", "24 oz", "32 oz", "40 oz"),
    ),
    (
        frozenset({"cooker", "pot", "cooler", "fryer", "stockpot", "crockpot"}),
        ("3 Qt", "6 Qt", "8 Qt", "10 Qt", "45 Quart"),
    ),
    (frozenset({"pan", "skillet", "wok", "griddle"}), ("20cm", "24cm", "28cm", "30cm", "10 inch", "12 inch")),
    (
        frozenset({"tv", "monitor", "laptop", "display", "tablet", "screen", "projector"}),
        ("13.3 inch", "14 inch", "15.6 inch", "17.3 inch", "24 inch", "27 inch", "32 inch", "43 inch", "55 inch"),
    ),
    (
        frozenset({"cable", "cord", "hose", "leash", "rope", "extension", "strip", "lights", "chain"}),
        ("3 ft", "6 ft", "10 ft", "25 ft", "50 ft", "1m", "2m", "5m"),
    ),
    (
        frozenset({"shoes", "boots", "sneakers", "sandals", "slippers", "cleats", "trainers", "loafers"}),
        ("Size 6", "Size 7", "Size 8", "Size 9", "Size 10", "Size 10.5", "Size 11", "Size 12", "Wide Fit"),
    ),
    (frozenset({"jeans", "pants", "trousers", "shorts", "chinos"}), ("30x30", "32x30", "32x32", "34x32", "36x34")),
    (
        frozenset({"shirt", "t-shirt", "dress", "jacket", "hoodie", "sweater", "leggings", "coat", "jersey", "socks"}),
        ("Size XS", "Size S", "Size M", "Size L", "Size XL", "Size XXL"),
    ),
    (
        frozenset({"heater", "vacuum", "blender", "drill", "microwave", "dryer", "mixer", "toaster", "grinder", "saw"}),
        ("600W", "800W", "1000W", "1200W", "1500W", "1800W", "18V", "20V"),
    ),
)
_GENERIC_UNITS = tuple(f"Pack of {n}" for n in PACKS) + MATERIALS


# ---------------------------------------------------------------------------------------------------------------
# Held-out texts


def normalise(text: str) -> str:
    """Case-folded word characters, single-spaced: "French Press, 34oz" and "french press 34oz" are one text."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def held_out_texts() -> list[str]:
    """Every text the evaluation or the parity checks see: relevance.json's and typed.json's queries and
    product titles, and the parity texts."""
    typed = load_typed_eval_set()  # relevance.json's products and queries with typed.json's
    return list(parity_texts()) + [product["title"] for product in typed.products] + [q.text for q in typed.queries]


def shipped_texts() -> list[str]:
    """The shipped corpus (titles, then queries) without held-out texts or repeats: the texts for corpus_size 0."""
    return _distinct(corpus_lines("titles.txt") + corpus_lines("queries.txt"), {normalise(t) for t in held_out_texts()})


def training_texts(spec: DistillSpec) -> list[str]:
    """The texts a DistillSpec trains on: the shipped corpus, or `corpus_size` generated ones."""
    return distillation_texts(spec.corpus_size, spec.seed) if spec.corpus_size else shipped_texts()


def _distinct(texts: list[str], excluded: set[str]) -> list[str]:
    seen = set(excluded)
    kept = []
    for text in texts:
        key = normalise(text)
        if key and key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class _Product:
    """A product phrase from a shipped title: the title's head, its own extra attributes, and query words."""

    head: str  # "Heat Gun 2000W"
    extras: tuple[str, ...]  # the shipped title's other comma parts: "Variable Temp", "with 4 Nozzles"
    core: str  # lower-case words a shopper types: "heat gun"
    units: tuple[str, ...]  # attribute values that fit the product


def distillation_texts(n: int = DEFAULT_SIZE, seed: int = 0) -> list[str]:
    """n distinct texts (by normalised form): the shipped corpus first, then generated product families.
    None is a held-out text; the same (n, seed) gives the same list, and a smaller n a prefix of it."""
    held_out = {normalise(t) for t in held_out_texts()}
    texts = shipped_texts()[:n]
    seen = held_out | {normalise(t) for t in texts}
    products = [_product(title) for title in corpus_lines("titles.txt")]
    queries = corpus_lines("queries.txt")
    rng = random.Random(seed)
    while len(texts) < n:
        for text in _family(rng, rng.choice(products), queries):
            key = normalise(text)
            if key not in seen and len(texts) < n:
                seen.add(key)
                texts.append(text)
    return texts


def _product(title: str) -> _Product:
    head, *extras = [part.strip() for part in title.split(",") if part.strip()]
    # The words before a qualifier ("for …", "with …", ": subtitle") name the product; shoppers type the first few.
    noun = re.split(r":| - | with | for | \(", head, maxsplit=1)[0]
    words = [w for w in re.sub(r"[\"“”]", "", noun).lower().split() if w]
    units = tuple(value for keys, values in _UNITS if keys & _kinds(noun) for value in values)
    return _Product(head, tuple(extras), " ".join(words[:4]) or head.lower(), units or _GENERIC_UNITS)


def _kinds(noun: str) -> set[str]:
    """The noun phrase's words, singular forms too ("Cables" → cables, cable), for looking up _UNITS."""
    words = set(re.findall(r"[a-z][a-z-]*", noun.lower()))
    return words | {w[:-1] for w in words if w.endswith("s")}


def _family(rng: random.Random, product: _Product, shipped_queries: list[str]) -> list[str]:
    """Two or three sibling titles of one product, then queries for it, and sometimes a varied shipped query."""
    brand = rng.choice(BRANDS)
    model = _model_number(rng, brand)
    siblings = rng.sample(product.units, k=min(len(product.units), rng.choice((2, 3))))
    texts = [_title(rng, brand, _sibling_model(model, i), product, unit) for i, unit in enumerate(siblings)]
    texts += [_query(rng, brand, model, product, rng.choice(siblings)) for _ in range(rng.choice((1, 2, 3)))]
    if rng.random() < 0.3:
        texts.append(_varied_query(rng, rng.choice(shipped_queries)))
    return [t for t in texts if t]


def _model_number(rng: random.Random, brand: str) -> str:
    """An invented model number: the brand's initial, a letter, digits and a suffix ("BK-420 Pro")."""
    letters = brand[0] + rng.choice("ABCDEFGHJKLMNPRSTVWXZ")
    digits = str(rng.choice((rng.randint(10, 99), rng.randint(100, 999), rng.randint(1000, 9999))))
    suffix = rng.choice(MODEL_SUFFIXES)
    return f"{letters}-{digits}" + (f" {suffix}" if suffix else "")


def _sibling_model(model: str, index: int) -> str:
    """Siblings share a model line and differ in its last digit, as WH-1000XM4 and XM5 do."""
    if index == 0:
        return model
    stem, _, rest = model.partition(" ")
    return f"{stem[:-1]}{(int(stem[-1]) + index) % 10}" + (f" {rest}" if rest else "")


def _title(rng: random.Random, brand: str, model: str, product: _Product, unit: str) -> str:
    extras = list(rng.sample(product.extras, k=rng.randint(0, len(product.extras))))
    form = rng.randrange(3)
    if form == 0:
        return ", ".join([f"{brand} {product.head}", unit, *extras] + _maybe(rng, rng.choice(COLOURS)))
    if form == 1:
        return " ".join([brand, model, product.head, unit, *_maybe(rng, rng.choice(COLOURS))])
    return ", ".join([f"{product.head} by {brand}", unit, rng.choice(MATERIALS), *extras])


def _query(rng: random.Random, brand: str, model: str, product: _Product, unit: str) -> str:
    """2–8 lower-case words, as shoppers type them; "" when a form runs too long."""
    core = product.core
    typed_model = model.lower() if rng.random() < 0.5 else model.lower().replace("-", "")
    forms = (
        f"{core} {unit}",
        f"{brand} {core}",
        f"{brand} {typed_model}",
        f"{typed_model} {core.split()[-1]}",
        f"{rng.choice(COLOURS)} {core}",
        f"{core} {rng.choice(MATERIALS)}",
        f"{core} for {rng.choice(AUDIENCES)}",
        f"{core} under ${rng.choice((15, 20, 25, 30, 50, 100, 200))}",
        f"best {core} {unit}",
        f"{brand} {core} {unit}",
    )
    return _as_query(rng.choice(forms))


def _varied_query(rng: random.Random, query: str) -> str:
    """A shipped query with one more constraint: a colour, a brand, a pack size or an audience."""
    modifier = rng.choice(
        (rng.choice(COLOURS), rng.choice(BRANDS), f"pack of {rng.choice(PACKS)}", f"for {rng.choice(AUDIENCES)}")
    )
    return _as_query(f"{modifier} {query}" if rng.random() < 0.5 else f"{query} {modifier}")


def _as_query(text: str) -> str:
    text = text.lower()
    return text if MIN_QUERY_WORDS <= len(text.split()) <= MAX_QUERY_WORDS else ""


def _maybe(rng: random.Random, part: str) -> list[str]:
    return [part] if rng.random() < 0.5 else []
