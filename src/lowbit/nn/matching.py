"""Choosing modules by name with anchored patterns (never bare substrings).

A pattern selects a module whose dotted name equals it, ends with "." + pattern (so "q_proj" picks
every layer's q_proj, as PEFT's target_modules do), or matches it as a whole glob
("model.layers.*.mlp.*"). "lora_head" therefore never matches a pattern "head".
"""

from __future__ import annotations

from fnmatch import fnmatchcase


def name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatchcase(name, pattern)


def matches_any(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(name_matches(name, p) for p in patterns)
