"""Strings for tokenizer parity tests (importable: `from tokenizer_corpus import CORPUS`).

Hand-written cases for the known trouble spots (leading/trailing/runs of whitespace, newlines,
digits, contractions, accents, CJK, emoji and ZWJ sequences, code, special tokens written in the
text), plus deterministic random mixes of the same fragments. Every entry is valid UTF-8 text.
"""

from __future__ import annotations

import random

_HAND: list[str] = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \n \n",
    "a",
    "Hello",
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello  world",
    "Hello   world    again",
    "hello\nworld",
    "hello\n\nworld\n\n\n",
    "line one\r\nline two\r\n",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "I'm sure you'll see it's what we'd've done, isn't it? They're, we've, I'd, you'll.",
    "I'M SHOUTING, DON'T YOU SEE? IT'S LOUD.",
    "Numbers: 0 1 12 123 1234 12345 123456 1234567890",
    "3.14159 2.71828 -42 +7 1e-10 0x1F 0b1010 1_000_000",
    "Dates 2024-01-31, times 23:59:59, money $1,234.56 and €99,99.",
    "Phone: +1 (555) 123-4567; ID #A12B34.",
    "version 1.2.3-beta+build.456",
    "Café naïve résumé façade coöperate Über straße",
    "Ångström, Øresund, Æther, œuvre, ğ, ş, ı, İstanbul",
    "Ça va? Très bien! ¿Qué tal? ¡Olé!",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    "שלום עולם",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "你好，世界！",
    "我喜欢吃苹果和香蕉。",
    "日本語のテキストです。カタカナ、ひらがな、漢字。",
    "한국어 텍스트입니다.",
    "ภาษาไทย",
    "Emoji: 😀 😃 😄 😁 😆",
    "Flags 🇺🇸🇫🇷🇯🇵 and families 👨‍👩‍👧‍👦 and skin 👍🏽",
    "🚀🚀🚀 launch!!!",
    "math: ∑ ∫ √ ∞ ≤ ≥ ≠ ± × ÷ π θ λ",
    "arrows → ← ↑ ↓ ⇒ and boxes ┌─┐└─┘",
    "zero\u200bwidth\u200cjoiners\u200d",
    "non\u00a0breaking\u00a0spaces",
    "combining e\u0301 vs é",
    "fullwidth ＡＢＣ １２３",
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n    def __init__(self):\n        self.x = {'a': [1, 2, 3]}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "const f = async (x) => { await g(x); return x ?? null; };",
    "<div class=\"x\">Hello &amp; goodbye</div>",
    '{"key": "value", "list": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "path/to/file.txt C:\\Windows\\System32 ~/.bashrc",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "    indented with spaces",
    "\tindented with a tab",
    "trailing spaces   ",
    "mixed \t tabs \t and spaces",
    "----- ===== ***** _____ ~~~~~",
    "!!!???...,,,;;;:::",
    "(((nested))) [[[brackets]]] {{{braces}}}",
    "'single' \"double\" `back` «guillemets» „low“",
    "a-b_c.d/e\\f|g",
    "ALLCAPS lowercase MiXeDcAsE camelCase snake_case kebab-case",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ab" * 40,
    "1" * 60,
    " " * 17 + "x",
    "\n" * 9 + "y",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|>",
    "text before <|im_start|> and after",
    "<|endoftext|>",
    "<|endoftext|>next document",
    "a<|im_end|>b",
    " <|im_start|> ",
    "<|im_start",
    "im_start|>",
    "<| im_start |>",
    "<repo_name>pyserve<file_sep>main.py",
    "<s> </s> <unk> [INST] [/INST] <<SYS>>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
]

_FRAGMENTS = [
    "the", " The", "model", " tokens", " ", "  ", "\n", "\n\n", "\t", "42", " 1234", "3.5", "café", " naïve",
    "中文", "日本", "🙂", "🚀", "👨‍👩‍👧", "def", "():", " {", "}", "[", "]", "\"quoted\"", "'s", "'ll", "!",
    "?", ",", ".", "...", "—", "–", "<|im_start|>", "<|im_end|>", "user", "assistant", "Привет", "αβγ", "x=1;",
    "    ", "ALL", "CAPS", "ß", "ñ", "ø", "%", "$", "#", "@", "&&", "||", "->", "=>", "\r\n",
]


def _mixes(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        out.append("".join(rng.choice(_FRAGMENTS) for _ in range(k)))
    return out


CORPUS: list[str] = _HAND + _mixes(150)

# A text long enough to exercise long-sequence paths (a few thousand characters).
LONG_TEXT = "\n".join(_HAND[8:60]) * 3

assert len(CORPUS) >= 200
