"""Checks of an aligned model that do not trust the reward models it was optimised on: refusals on XSTest,
machine-checkable system instructions across turns (GAtt), length-controlled win rates, and the length
baselines a reward model's accuracy must beat."""
