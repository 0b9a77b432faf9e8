"""The training progress line: steps done, cells/s and an ETA that knows about early stopping.

A run stops at ``max_iter`` steps at the latest and, with early stopping, possibly at any
epoch from ``min_iter`` on, so a single ETA would be wrong one way or the other. The line
gives both::

    train |██▍             | step 2,400/30,000 (early stop possible after 10,000) · 1,210 cells/s · ETA 3m21s to the floor, at most 12m

Speeds come from a moving average of the measured step time over the last minute (at least
100 steps, at most 10,000; data loading, checkpoints and epoch scoring included), so the
first slow steps are soon forgotten and a burst of fast or slow steps does not swing the
ETA. Drawn in the package's bar style (:mod:`scatac_dist.progress`: tqdm on stderr), in one
process only (rank 0).
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["eta", "format_duration", "progress_text", "ProgressBar"]


def eta(step: int, min_iter: int, max_iter: int, seconds_per_step: float) -> tuple[float | None, float]:
    """Seconds to the early-stopping floor (``None`` once it is passed, or when there is none
    before ``max_iter``) and seconds to ``max_iter``, at ``seconds_per_step``."""
    to_end = max(max_iter - step, 0) * seconds_per_step
    to_floor = (min_iter - step) * seconds_per_step if step < min_iter < max_iter else None
    return to_floor, to_end


def format_duration(seconds: float) -> str:
    """``45s``, ``1m50s`` (under 10 minutes), ``16m``, ``2h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        m, s = divmod(s, 60)
        return f"{m}m{s:02d}s"
    m = int(round(seconds / 60))
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def progress_text(step: int, min_iter: int, max_iter: int, seconds_per_step: float | None,
                  batch_size: int) -> str:
    """The progress line for ``step`` (see the module docstring); ``seconds_per_step=None``
    before any step has been timed."""
    text = f"step {step:,}/{max_iter:,}"
    if 0 < min_iter < max_iter:
        text += f" (early stop possible after {min_iter:,})" if step < min_iter else " (early stop possible)"
    elif min_iter <= 0:
        text += " (early stop possible)"
    if not seconds_per_step or seconds_per_step <= 0:
        return text + " · ETA ?"
    to_floor, to_end = eta(step, min_iter, max_iter, seconds_per_step)
    text += f" · {batch_size / seconds_per_step:,.0f} cells/s · ETA "
    if to_floor is not None:
        return text + f"{format_duration(to_floor)} to the floor, at most {format_duration(to_end)}"
    if min_iter < max_iter:
        return text + f"at most {format_duration(to_end)}"
    return text + format_duration(to_end)


class ProgressBar:
    """The training bar: tqdm on stderr whose text is :func:`progress_text`, with the last
    epoch's loss appended.

    Parameters
    ----------
    start_step, min_iter, max_iter
        Where the run starts (a resumed run starts past 0) and its stopping rule.
    batch_size
        Cells per step over all ranks (for cells/s).
    horizon_s, min_steps, max_steps
        The moving average spans the last ``horizon_s`` seconds, but at least ``min_steps``
        and at most ``max_steps`` steps.
    """

    def __init__(self, start_step: int, min_iter: int, max_iter: int, batch_size: int, *,
                 horizon_s: float = 60.0, min_steps: int = 100, max_steps: int = 10_000):
        from ..progress import bar

        self.min_iter, self.max_iter, self.batch_size = min_iter, max_iter, batch_size
        self.horizon_s, self.min_steps = horizon_s, min_steps
        self.times: deque[float] = deque([time.perf_counter()], maxlen=max_steps + 1)
        self.step, self.loss = start_step, ""
        self.bar = bar(total=max_iter, initial=start_step, bar_format="train |{bar:16}| {desc}")
        self._show()

    def seconds_per_step(self) -> float | None:
        t = self.times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    def _show(self) -> None:
        text = progress_text(self.step, self.min_iter, self.max_iter, self.seconds_per_step(), self.batch_size)
        self.bar.set_description_str(text + self.loss, refresh=False)

    def update(self, step: int) -> None:
        """After each optimisation step (``step``: steps done)."""
        t = self.times
        t.append(time.perf_counter())
        while len(t) > self.min_steps + 1 and t[-1] - t[1] >= self.horizon_s:
            t.popleft()
        self.step = step
        self._show()
        self.bar.update(1)

    def epoch(self, epoch: int, loss: float) -> None:
        """After each scored epoch."""
        self.loss = f" · loss {loss:.4g} (epoch {epoch})"

    def close(self) -> None:
        self._show()
        self.bar.close()
