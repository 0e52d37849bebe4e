"""Reward functions for tests, loaded by import path ("reward_fixtures:has_seven") like a user's own.

A random-init policy never solves a math task, so every advantage would be 0 and nothing would move; this reward
gives it signal (a 12-character random completion contains a '7' about 12% of the time).
"""


def has_seven(completion: str, answer: str) -> float:
    return 1.0 if "7" in completion else 0.0


def kill_worker_on_seven(completion: str, answer: str) -> float:
    """Kills the reward worker process it runs in when the completion has a '7' (fault injection)."""
    if "7" in completion:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    return 1.0 if "3" in completion else 0.0


def hang_on_seven(completion: str, answer: str) -> float:
    """Never returns when the completion has a '7' (fault injection: the per-call timeout must end it)."""
    if "7" in completion:
        import time

        time.sleep(3600)
    return 1.0 if "3" in completion else 0.0


def huge_on_odd_first_char(completion: str, answer: str) -> float:
    """A finite reward so large that the gradient norm overflows in fp32: every live mini-batch is skipped."""
    return 1e30 if completion and ord(completion[0]) % 2 else 0.0
