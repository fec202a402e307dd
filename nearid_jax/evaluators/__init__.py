"""Evaluation, in layers: embed (the one tower pass over a split), nearid /
mtg / dreambench (the scores), report (files), evaluate (the driver)."""
