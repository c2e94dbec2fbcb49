"""A labelled contact sheet of generated images (each caption under its image)."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont


def caption_grid(images: list[Image.Image], captions: list[str], columns: int = 6, scale: int = 2) -> Image.Image:
    """Tile ``images`` ``columns`` wide, each upscaled ``scale`` times with its caption below it."""
    if len(images) != len(captions) or not images:
        raise ValueError("need one caption per image, and at least one image")
    font = ImageFont.load_default()
    side = images[0].width * scale
    line_height = 12
    label_lines = 3
    cell_w, cell_h = side + 8, side + 8 + line_height * label_lines
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (cell_w * min(columns, len(images)), cell_h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        sheet.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
        # Drop the fixed "a ... on a ... background" frame words to fit the cell.
        short = text.removeprefix("a ").replace(" on a ", " on ").removesuffix(" background")
        short = short.replace("to the left of", "left of").replace("to the right of", "right of")
        for j, line in enumerate(textwrap.wrap(short, width=max(8, side // 6))[:label_lines]):
            draw.text((x, y + side + 2 + j * line_height), line, fill="black", font=font)
    return sheet
