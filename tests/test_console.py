"""The console: the command line's log lines go through tqdm's writer, so a warning printed while a
progress bar is drawn starts on a line of its own instead of in the middle of the bar."""

from __future__ import annotations

import io
import logging
import re
import sys

from tqdm.auto import tqdm

from prefopt.cli import ProgressAwareHandler


def bar_then_warning(handler_cls) -> str:
    stream = io.StringIO()
    logger = logging.getLogger("prefopt.console-test")
    logger.propagate = False
    handler = handler_cls(stream) if handler_cls is logging.StreamHandler else handler_cls()
    handler.setFormatter(logging.Formatter("prefopt: %(message)s"))
    logger.handlers = [handler]
    real = sys.stderr
    sys.stderr = stream  # tqdm.write clears and redraws the bars on the stream it writes to
    try:
        with tqdm(total=10, file=stream, ascii=True, desc="training", mininterval=0) as bar:
            bar.update(3)
            logger.warning("step 3: chosen log-probs are falling")
            bar.update(3)
    finally:
        sys.stderr = real
    return stream.getvalue()


def warning_line(text: str) -> str:
    """What the terminal shows on the warning's line: the text after the last carriage return."""
    line = next(part for part in text.split("\n") if "chosen log-probs are falling" in part)
    return re.split(r"\r", line)[-1].strip()


def test_a_warning_gets_its_own_line_during_a_progress_bar():
    assert warning_line(bar_then_warning(ProgressAwareHandler)) == "prefopt: step 3: chosen log-probs are falling"


def test_without_it_the_warning_lands_in_the_bar():
    """The check above can fail: a plain stream handler writes the warning after the bar's text."""
    shown = warning_line(bar_then_warning(logging.StreamHandler))
    assert shown.startswith("training") and shown.endswith("falling")
