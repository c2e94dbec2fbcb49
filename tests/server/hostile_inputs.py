"""Inputs that broke the server's hand-written parsing, and their siblings.

Each list holds text that must be refused with a 400 naming the field (never a
500, never silently accepted). They are shared by the parsing, API and soak tests.
"""

from __future__ import annotations

# Sizes that pass str.isdigit() but not int(), digits of other scripts that int()
# accepts, and ASCII forms outside the grammar (spaces, signs, zeros, separators).
BAD_SIZES = [
    "²x64", "64x²", "①x64", "64x①", "¹²⁸x64",             # isdigit() true, int() fails
    "٦٤x٦٤", "𝟔𝟒x𝟔𝟒", "६४x६४", "６４x６４", "64x٦٤",       # non-ASCII digits int() accepts
    " 64x64", "64x64 ", "64 x 64", "64x 64", "\t64x64", "64x64\n",
    "0064x0064", "064x64", "0x64", "64x0", "+64x64", "64x-64", "6_4x64",
    "64×64", "64х64", "64*64", "64,64", "64xx64", "x64", "64x", "64", "", "123456x64",
]

# Sizes in the grammar (the model then decides whether it can draw them).
GOOD_SIZES = {"64x64": (64, 64), "32X64": (64, 32), "128x32": (32, 128)}

# Prompts with nothing visible in them: whitespace, zero-width and format characters,
# NUL and other controls, blank-looking letters.
INVISIBLE_PROMPTS = [
    "\u200b", "\u200b\u200c\u200d", "\ufeff", "\u2060", "\u00ad", "\u200e\u200f", "\u202e",
    " \u3000\u00a0", "\u2028", "\u3164", "\u2800", "\u115f\u1160", "\u034f",
    "\n\t \n", "\u200b \u200b\n",
]

# Prompts with visible text but a control character other than tab and newline.
CONTROL_PROMPTS = [
    "a red\x00 circle", "a red circle\x00", "\x1b[31ma red circle", "a red\rcircle", "a red\x7fcircle",
    "a red\x85circle", "a red\x08circle", "\x00", "\x01\x02",
]

# Prompts that must be accepted: visible text with tabs, newlines and non-Latin scripts.
GOOD_PROMPTS = ["a red circle", "a red\tcircle\non a blue background", "a red circle\r\non a blue background",
                "un cercle rouge é", "赤い円", "a 🔴"]

# Request ids (X-Request-Id and the DELETE path) outside [A-Za-z0-9._-]{1,64}.
BAD_REQUEST_IDS = ["id with space", "ïd", "١٢٣", "a/b", "a" * 65, "id\u200b", "id%00"]
