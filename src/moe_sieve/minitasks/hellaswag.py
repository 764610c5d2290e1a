"""HellaSwag-shaped everyday scenes: a context and four endings, one of them right."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .common import (
    Row,
    person,
)


@dataclass(frozen=True)
class Scene:
    """An everyday activity: the context names an ``{x}`` that the right ending must mention again."""

    activity: str
    ctx: str
    ending: str
    options: tuple[str, ...]


SCENES: tuple[Scene, ...] = (
    Scene(
        "Making tea",
        "{name} fills the kettle and sets a mug with a {x} on the counter. When the water boils, {pron}",
        "pours it over the {x} and lets it steep.",
        ("green tea bag", "mint tea bag", "black tea bag", "chamomile tea bag"),
    ),
    Scene(
        "Washing dishes",
        "{name} stacks the dirty {x} in the sink and turns on the warm water. {Pron}",
        "scrubs the {x} with a soapy sponge and rinses them.",
        ("plates", "bowls", "cups", "pans"),
    ),
    Scene(
        "Brushing teeth",
        "{name} squeezes toothpaste onto {pos} {x} and looks in the mirror. {Pron}",
        "brushes {pos} teeth with the {x} for two minutes.",
        ("blue toothbrush", "new toothbrush", "electric toothbrush", "soft toothbrush"),
    ),
    Scene(
        "Watering plants",
        "{name} fills a watering can at the tap and walks over to the {x}. {Pron}",
        "tips the can and waters the {x} until the soil is damp.",
        ("tomato plants", "rose bushes", "potted herbs", "sunflowers"),
    ),
    Scene(
        "Riding a bike",
        "{name} puts on {pos} helmet and wheels {pos} {x} out of the garage. {Pron}",
        "climbs onto the {x} and pedals down the street.",
        ("red bike", "mountain bike", "old bicycle", "racing bike"),
    ),
    Scene(
        "Baking cookies",
        "{name} mixes butter, sugar and {x} into a soft dough. {Pron}",
        "rolls the dough full of {x} into balls and puts them in the oven.",
        ("chocolate chips", "oats", "raisins", "nuts"),
    ),
    Scene(
        "Painting a room",
        "{name} pours {x} paint into a tray and picks up a roller. {Pron}",
        "rolls the {x} paint evenly across the wall.",
        ("blue", "white", "yellow", "green"),
    ),
    Scene(
        "Walking the dog",
        "{name} clips a leash onto the collar of {pos} {x} and opens the front door. {Pron}",
        "walks the {x} around the block and lets it sniff the grass.",
        ("puppy", "beagle", "old dog", "terrier"),
    ),
    Scene(
        "Changing a tire",
        "{name} loosens the nuts on the flat {x} tire and raises the car with a jack. {Pron}",
        "pulls off the flat tire and bolts the spare onto the {x} wheel.",
        ("front", "rear", "left", "right"),
    ),
    Scene(
        "Making a sandwich",
        "{name} lays two slices of bread on a plate and opens a jar of {x}. {Pron}",
        "spreads the {x} on the bread and presses the slices together.",
        ("peanut butter", "jam", "honey", "hummus"),
    ),
    Scene(
        "Playing guitar",
        "{name} sits on a stool and tunes the strings of {pos} {x}. {Pron}",
        "strums a few chords on the {x} and starts to sing.",
        ("acoustic guitar", "old guitar", "electric guitar", "ukulele"),
    ),
    Scene(
        "Fishing",
        "{name} baits a hook with a {x} and walks to the end of the dock. {Pron}",
        "casts the line with the {x} into the lake and waits for a bite.",
        ("worm", "small minnow", "piece of bread", "shiny lure"),
    ),
    Scene(
        "Doing laundry",
        "{name} carries a basket of {x} to the washing machine. {Pron}",
        "loads the {x} into the machine and adds a scoop of soap.",
        ("towels", "shirts", "socks", "bed sheets"),
    ),
    Scene(
        "Building a snowman",
        "{name} rolls two balls of snow into a snowman and takes a {x} from {pos} pocket. {Pron}",
        "presses the {x} into the face of the snowman as a nose.",
        ("carrot", "pine cone", "red button", "small stick"),
    ),
    Scene(
        "Mowing the lawn",
        "{name} fills the {x} with fuel and pulls the starter cord. {Pron}",
        "pushes the {x} in neat rows across the grass.",
        ("lawn mower", "old mower", "push mower", "new mower"),
    ),
    Scene(
        "Reading a book",
        "{name} curls up on the couch with a {x} and a cup of cocoa. {Pron}",
        "opens the {x} to the first page and begins to read.",
        ("mystery novel", "thick book", "comic book", "library book"),
    ),
    Scene(
        "Swimming",
        "{name} changes into {pos} swimsuit and walks to the edge of the {x}. {Pron}",
        "dives into the {x} and swims a few laps.",
        ("pool", "lake", "pond", "river"),
    ),
    Scene(
        "Cooking pasta",
        "{name} brings a pot of salted water to a boil and opens a box of {x}. {Pron}",
        "drops the {x} into the pot and stirs it with a wooden spoon.",
        ("spaghetti", "penne", "macaroni", "noodles"),
    ),
    Scene(
        "Wrapping a present",
        "{name} cuts a sheet of {x} wrapping paper and sets a box in the middle. {Pron}",
        "folds the {x} paper around the box and tapes it shut.",
        ("red", "striped", "gold", "flowered"),
    ),
    Scene(
        "Flying a kite",
        "{name} unrolls the string of {pos} {x} kite on a windy hill. {Pron}",
        "runs into the wind until the {x} kite rises into the sky.",
        ("red", "dragon", "diamond", "paper"),
    ),
    Scene(
        "Planting a tree",
        "{name} digs a deep hole in the yard and lifts a young {x} tree from its pot. {Pron}",
        "sets the {x} tree in the hole and packs soil around its roots.",
        ("apple", "oak", "maple", "cherry"),
    ),
    Scene(
        "Cleaning windows",
        "{name} sprays cleaner on the {x} window and takes out a cloth. {Pron}",
        "wipes the {x} window until the glass shines.",
        ("kitchen", "bedroom", "car", "front"),
    ),
    Scene(
        "Making a smoothie",
        "{name} drops {x} and a cup of yogurt into the blender. {Pron}",
        "blends the {x} and yogurt until smooth and pours it into a glass.",
        ("bananas", "strawberries", "blueberries", "mango slices"),
    ),
    Scene(
        "Shoveling snow",
        "{name} pulls on {pos} boots and grabs a shovel to clear the {x}. {Pron}",
        "scoops the snow off the {x} and piles it beside the path.",
        ("driveway", "sidewalk", "front steps", "porch"),
    ),
    Scene(
        "Tying shoes",
        "{name} sits on the bottom stair and slips on {pos} {x}. {Pron}",
        "ties the laces of the {x} in a double knot.",
        ("sneakers", "running shoes", "hiking boots", "school shoes"),
    ),
    Scene(
        "Feeding a cat",
        "{name} hears the cat meow and opens a can of {x}. {Pron}",
        "spoons the {x} into the bowl of the cat and sets it on the floor.",
        ("tuna", "salmon", "chicken", "cat food"),
    ),
    Scene(
        "Setting the table",
        "{name} takes the {x} from the cupboard before the guests arrive. {Pron}",
        "places the {x} neatly at each seat around the table.",
        ("dinner plates", "napkins", "forks and knives", "glasses"),
    ),
    Scene(
        "Playing basketball",
        "{name} dribbles the ball down the court toward the {x}. {Pron}",
        "jumps and shoots the ball at the {x}.",
        ("hoop", "basket", "far hoop", "net"),
    ),
    Scene(
        "Packing a suitcase",
        "{name} opens {pos} suitcase on the bed and folds {pos} {x}. {Pron}",
        "lays the folded {x} in the suitcase and zips it closed.",
        ("shirts", "sweaters", "pants", "jackets"),
    ),
    Scene(
        "Writing a letter",
        "{name} sits at the desk with a {x} and a sheet of paper. {Pron}",
        "writes a short letter to a friend with the {x}.",
        ("blue pen", "pencil", "fountain pen", "black marker"),
    ),
    Scene(
        "Ironing clothes",
        "{name} sets up the ironing board and lays a wrinkled {x} across it. {Pron}",
        "presses the hot iron over the {x} until it is smooth.",
        ("shirt", "dress", "pair of pants", "tablecloth"),
    ),
    Scene(
        "Lighting a campfire",
        "{name} stacks dry {x} in the fire pit and strikes a match. {Pron}",
        "holds the match to the {x} until the flames catch.",
        ("twigs", "logs", "pine branches", "sticks"),
    ),
    Scene(
        "Taking a photo",
        "{name} lifts {pos} camera and points it at the {x}. {Pron}",
        "presses the button and takes a picture of the {x}.",
        ("sunset", "mountains", "old bridge", "birds"),
    ),
    Scene(
        "Vacuuming",
        "{name} plugs in the vacuum cleaner and pushes it into the {x}. {Pron}",
        "runs the vacuum back and forth across the carpet of the {x}.",
        ("living room", "hallway", "bedroom", "office"),
    ),
)


def fill_scene(template: str, name: str, pron: str, pos: str, x: str) -> str:
    return template.format(name=name, pron=pron, Pron=pron.capitalize(), pos=pos, x=x)


def scene_parts(rng: random.Random) -> tuple[Scene, str, str, str, str]:
    scene = rng.choice(SCENES)
    name, pron, pos = person(rng)
    return scene, name, pron, pos, rng.choice(scene.options)


def hellaswag_item(rng: random.Random) -> Row:
    """A scene's context, its own ending and three endings of other scenes (same person, so only content differs)."""
    scene, name, pron, pos, x = scene_parts(rng)
    others = rng.sample([s for s in SCENES if s is not scene], 3)
    endings = [fill_scene(o.ending, name, pron, pos, rng.choice(o.options)) for o in others]
    label = rng.randrange(4)
    endings.insert(label, fill_scene(scene.ending, name, pron, pos, x))
    ctx = fill_scene(scene.ctx, name, pron, pos, x)
    return {"activity_label": scene.activity, "ctx": ctx, "endings": endings, "label": str(label)}
