"""The controlled-sentiment task: movie-review openings and an external sentiment reward (VADER).

The prompts are 240 opening fragments of movie reviews written for this project. The reward is
VADER's compound score in [−1, 1] of the continuation alone (the prompt is the same for every
sample of a prompt, so it carries no preference signal).
"""

from __future__ import annotations

from importlib import resources

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


def prompts() -> list[str]:
    """The movie-review openings shipped with prefopt, one per non-empty line of the prompts file."""
    text = resources.files("prefopt.tasks").joinpath("movie_review_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


_analyzer = None


def vader_reward(texts: list[str]) -> list[float]:
    """VADER compound sentiment of each text (−1 most negative … +1 most positive)."""
    global _analyzer
    if _analyzer is None:  # built on first use: it reads VADER's lexicon files
        _analyzer = SentimentIntensityAnalyzer()
    return [_analyzer.polarity_scores(t)["compound"] for t in texts]
