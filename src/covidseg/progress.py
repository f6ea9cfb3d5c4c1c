"""One progress callback for every stage: ``progress(done, total, message)``.

A stage calls it after each finished item (a case, a training step) with how many of `total` items
are done and one short line about the item (its case id and outcome, a step's losses). The stage
knows `total`; a caller only shows the figures (the CLI draws a rich progress bar) and never counts
the inputs itself. Stages never print.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

#: progress(done, total, message): `done` of `total` items finished; `message` one short line
Progress = Callable[[int, int, str], None]

#: The Progress of each named part of a longer job: ``progress_for("train-gan")(done, total, message)``
#: (`covidseg run` and `covidseg demo` show one bar per stage).
ProgressFor = Callable[[str], Progress]


def silent(done: int, total: int, message: str) -> None:
    """A :data:`Progress` that shows nothing."""


def silent_for(name: str) -> Progress:
    """A :data:`ProgressFor` that shows nothing."""
    return silent


def losses_text(losses: Mapping[str, float]) -> str:
    """A training step's losses as one progress message, e.g. ``"d=0.693 rec=0.0123"``: the
    ``loss_`` prefix dropped, terms that are 0 (switched off) left out, 3 significant digits."""
    return " ".join(f"{key.removeprefix('loss_')}={value:.3g}" for key, value in losses.items() if value)
