"""Reward functions for tests, loaded by import path ("reward_fixtures:has_seven") like a user's own.

A random-init policy never solves a math task, so every advantage would be 0 and nothing would move; this reward
gives it signal (a 12-character random completion contains a '7' about 12% of the time).
"""


def has_seven(completion: str, answer: str) -> float:
    return 1.0 if "7" in completion else 0.0
