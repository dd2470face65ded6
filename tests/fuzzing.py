"""How hard the property tests try: ``make test`` runs them bounded;
``make fuzz`` sets TRACEWIRE_FUZZ_SCALE (default 1) to run N times more
examples of every hypothesis test, over every decoder."""

from __future__ import annotations

import os

SCALE = max(1, int(os.environ.get("TRACEWIRE_FUZZ_SCALE", "1")))


def examples(n: int) -> int:
    """``n`` examples in ``make test``, ``n * SCALE`` in ``make fuzz``."""
    return n * SCALE
