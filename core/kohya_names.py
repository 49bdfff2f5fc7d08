"""Kohya's flattened module names (every "." of a module path replaced by "_") back to dotted
paths: the one splitter both model families' namings (``sdxl_unet``, ``flux_blocks``) use."""

from __future__ import annotations


def unflatten(flat: str, module_words: list[str]) -> str:
    """``output_blocks_0_1_transformer_blocks_0_attn1_to_q`` -> ``output_blocks.0.1...``.

    Splits on "_" and greedily rejoins the longest known module word at each position
    (``module_words`` sorted longest first), so the result is unique; raises KeyError when a
    piece is not part of any module name of the family."""
    pieces = flat.split("_")
    words: list[str] = []
    position = 0
    while position < len(pieces):
        if pieces[position].isdigit():
            words.append(pieces[position])
            position += 1
            continue
        for word in module_words:
            length = word.count("_") + 1
            if "_".join(pieces[position:position + length]) == word:
                words.append(word)
                position += length
                break
        else:
            raise KeyError(flat)
    return ".".join(words)
