"""Plain-text tables of elkeidctl's listings (``services``, ``update``):
one line per row, whatever its cells hold, columns aligned, the last one
(the long free text) unpadded."""


def clip(value, width):
    """``value`` on one line, at most ``width`` characters ("..." where it
    was cut); "-" when empty."""
    text = " ".join(("" if value is None else str(value)).split())
    return (text[:width - 3] + "...") if len(text) > width else (text or "-")


def aligned(rows):
    """``rows`` (the header first) of strings, as lines."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                     for r in rows)
