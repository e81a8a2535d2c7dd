"""Rotary settings made to fit the tiny head dims (multimodal rope sections sum to half the rotary dims)."""

from __future__ import annotations


def scale_sections(sections, half: int) -> list[int]:
    """mrope-style sections rescaled to sum to `half` (largest remainder, each >= 1 where possible)."""
    sections = list(sections)
    total = sum(sections) or 1
    raw = [s * half / total for s in sections]
    out = [max(1, int(x)) if half >= len(sections) else int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(out) < half:
        out[order[i % len(out)]] += 1
        i += 1
    while sum(out) > half:
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def default_sections(half: int) -> list[int]:
    """Three mrope sections summing to `half` as [a, a, half - 2a]: families read them as (t, h, w) or as
    (h, w, t) with h and w interleaved (which needs the first two equal)."""
    a = max(1, (half + 2) // 3)
    if half - 2 * a < 1:
        a = max(1, (half - 1) // 2)
    return [a, a, half - 2 * a]


def shrink_rope(rope, rotary_dim_of):
    """rope_parameters / rope_scaling: mrope sections (possibly per layer type) made to fit the tiny head dims;
    `rotary_dim_of(partial_rotary_factor)` gives the tiny rotary width."""
    if not isinstance(rope, dict):
        return rope
    rope = dict(rope)
    if rope and all(isinstance(v, dict) or v is None for v in rope.values()):  # per layer type
        return {k: shrink_rope(v, rotary_dim_of) for k, v in rope.items()}
    for key in ("mrope_section", "mrope_sections"):
        if isinstance(rope.get(key), (list, tuple)):
            half = rotary_dim_of(rope.get("partial_rotary_factor")) // 2
            rope[key] = scale_sections(rope[key], half)
    return rope
