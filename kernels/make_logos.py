"""Draw the 64x64 logos that no kernel package ships (kernels/<name>/logo-64x64.png).

- the compiled languages (c, cpp, go, rust, java): the language's short name in white on a
  coloured rounded square, in DejaVu Sans Bold (matplotlib ships the font);
- bash: a terminal, a dark rounded square with a green ``>_`` prompt (shapes only).

The R, Deno and Octave logos come from their kernel packages (see LOGOS.md). Run with a Python
that has Pillow and matplotlib, e.g. the Python kernel image:

    docker run --rm -u "$(id -u)" -e MPLCONFIGDIR=/tmp -v "$PWD/kernels:/k" \
        backendai-jupyter/python python /k/make_logos.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
SIZE = 64
SCALE = 8  # drawn large, then scaled down: smooth edges
TEXT_LOGOS = {
    "c": ("C", "#3949AB"),
    "cpp": ("C++", "#00599C"),
    "go": ("Go", "#00ADD8"),
    "rust": ("Rs", "#B7410E"),
    "java": ("Java", "#E76F00"),
}


def _square(colour: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    big = SIZE * SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    canvas = ImageDraw.Draw(image)
    margin = 2 * SCALE
    canvas.rounded_rectangle((margin, margin, big - margin, big - margin), radius=12 * SCALE, fill=colour)
    return image, canvas


def text_logo(text: str, colour: str) -> Image.Image:
    import matplotlib

    image, canvas = _square(colour)
    big = SIZE * SCALE
    font_path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    # The largest size at which the text fits in about 3/4 of the square.
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


def bash_logo() -> Image.Image:
    image, canvas = _square("#293137")
    green = "#4eaa25"
    width = 6 * SCALE
    chevron = [(14 * SCALE, 20 * SCALE), (28 * SCALE, 32 * SCALE), (14 * SCALE, 44 * SCALE)]
    canvas.line(chevron, fill=green, width=width, joint="curve")
    for x, y in (chevron[0], chevron[2]):
        r = width // 2
        canvas.ellipse((x - r, y - r, x + r, y + r), fill=green)
    canvas.rounded_rectangle((32 * SCALE, 41 * SCALE, 50 * SCALE, 47 * SCALE), radius=3 * SCALE, fill=green)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def main() -> None:
    logos = {name: text_logo(text, colour) for name, (text, colour) in TEXT_LOGOS.items()}
    logos["bash"] = bash_logo()
    for name, image in logos.items():
        target = HERE / name / "logo-64x64.png"
        target.parent.mkdir(exist_ok=True)
        image.save(target, optimize=True)
        print(target)


if __name__ == "__main__":
    main()
