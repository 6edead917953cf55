"""Draw the 64x64 logos of the compiled-language kernels (kernels/<lang>/logo-64x64.png).

The language's short name in white on a coloured rounded square. Run with a Python that
has Pillow and matplotlib (for its DejaVu Sans Bold font), e.g. the Python kernel image:

    docker run --rm -u "$(id -u)" -e MPLCONFIGDIR=/tmp -v "$PWD/kernels:/k" \
        backendai-jupyter/python python /k/make_logos.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

SIZE = 64
SCALE = 4  # draw large, then scale down: smooth edges
LOGOS = {
    "c": ("C", "#3949AB"),
    "cpp": ("C++", "#00599C"),
    "go": ("Go", "#00ADD8"),
    "rust": ("Rs", "#B7410E"),
    "java": ("Java", "#E76F00"),
}


def draw(text: str, colour: str) -> Image.Image:
    big = SIZE * SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    canvas = ImageDraw.Draw(image)
    margin = 2 * SCALE
    canvas.rounded_rectangle((margin, margin, big - margin, big - margin), radius=12 * SCALE, fill=colour)
    font_path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    # The largest size at which the text fits in 3/4 of the square.
    size = 40 * SCALE
    while True:
        font = ImageFont.truetype(str(font_path), size)
        left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
        if right - left <= big * 0.72 and bottom - top <= big * 0.6:
            break
        size -= SCALE
    x = (big - (right - left)) / 2 - left
    y = (big - (bottom - top)) / 2 - top
    canvas.text((x, y), text, font=font, fill="white")
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, (text, colour) in LOGOS.items():
        target = here / name / "logo-64x64.png"
        target.parent.mkdir(exist_ok=True)
        draw(text, colour).save(target, optimize=True)
        print(target)


if __name__ == "__main__":
    main()
