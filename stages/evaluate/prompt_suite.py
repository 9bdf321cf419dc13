"""The evaluation prompt suite (issue 14): short prompts grouped by what they test, in the spirit
of DrawBench (Saharia et al. 2022), written for this project. The evaluate stage samples the first
``evaluate.suite_per_category`` of each category through every cascade and reports the CLIP score
per category (``<cascade>_clip_score_<category>``), so a run's weak spots show by name. Replace it
with ``evaluate.prompt_suite: path/to/suite.yaml`` (``categories: {name: [prompt, ...]}``).
"""
from __future__ import annotations

SUITE: dict[str, tuple[str, ...]] = {
    "colours": (
        'a red apple on a white table',
        'a blue bird sitting on a yellow fence',
        'a green car parked next to a purple door',
        'an orange cat on a black sofa',
        'a pink flower in a brown pot',
        'a white horse in a green field',
    ),
    "counts": (
        'one dog on a beach',
        'two cups of coffee on a wooden table',
        'three red balloons in the sky',
        'four books stacked on a desk',
        'five candles on a birthday cake',
        'six apples in a basket',
    ),
    "positions": (
        'a cat to the left of a dog',
        'a lamp above a bed',
        'a ball under a chair',
        'a tree to the right of a house',
        'a cup in front of a laptop',
        'a bicycle behind a fence',
    ),
    "text": (
        'a shop sign that says "OPEN"',
        'a street sign reading "STOP"',
        'a t-shirt with the word "HELLO" printed on it',
        'a book cover titled "DIFFUSION"',
        'a coffee mug with the letter "A" on it',
        'a neon sign spelling "CAFE"',
    ),
    "rare_words": (
        'a photo of an axolotl in an aquarium',
        'a pangolin walking on dry leaves',
        'a narwhal swimming under sea ice',
        'an okapi standing in a rainforest',
        'a quokka smiling at the camera',
        'a tardigrade under a microscope',
    ),
    "shapes": (
        'a large red circle in the center on a white background',
        'a small blue square in the top left corner',
        'a green triangle on a grey background',
        'a yellow star on a dark blue background',
        'a black ring on a white background',
        'two orange squares side by side',
    ),
    "styles": (
        'a watercolor painting of a lighthouse',
        'a pencil sketch of an old man',
        'a pixel art castle',
        'an oil painting of a sunflower field',
        'a cartoon drawing of a robot',
        'a black and white photo of a city street',
    ),
    "scenes": (
        'a busy market street at night',
        'a snowy mountain at sunrise',
        'a kitchen with a bowl of fruit on the counter',
        'a child flying a kite on a windy beach',
        'a library with tall wooden shelves',
        'a bowl of ramen with chopsticks',
    ),
}
