"""Quality metrics and DynaMo's same-quality speed-up (used by ``evals.quality_vs_speed`` and tests).

Pure functions on plain Python / numpy values; no model, no torch. Every definition the report
relies on is here and stated exactly:

* :func:`win_rate` — wins / (wins + losses), ties excluded (DynaMo, Sec. 4); 0.5 when every
  comparison ties (parity by convention), :func:`normalized_win_rate` = win rate / 0.5 (1.0 = parity).
* :func:`same_quality_speedup` — the speed-up at which a linear fit of normalized win rate against
  speed-up crosses 1.0, capped at the largest measured speed-up (and at ``H``), 1.0 when none.
* :func:`is_valid_completion` / :func:`valid_python_share` — does the completion (cut at its last
  complete line) keep the file parseable; see :func:`is_valid_completion` for the exact rule.
* :func:`distinct_n`, :func:`line_exact_match`, :func:`char_similarity` — repetition and agreement
  with the real continuation.
"""
from __future__ import annotations

import ast
import codeop
import difflib
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

__all__ = ["SameQuality", "char_similarity", "cut_at_last_line", "distinct_n", "is_valid_completion",
           "line_exact_match", "normalized_win_rate", "same_quality_speedup", "syntax_status",
           "nanmean", "valid_python_share", "win_loss_tie", "win_rate"]

PARITY_WIN_RATE = 0.5  # a method as good as the baseline wins as often as it loses


# ---------------------------------------------------------------- win rate


def win_loss_tie(scores: Sequence[float], baseline: Sequence[float], tol: float = 1e-6) -> Tuple[int, int, int]:
    """Pairwise comparison of ``scores[i]`` against ``baseline[i]`` (higher is better).

    A pair ties when ``|scores[i] - baseline[i]| <= tol`` (e.g. identical continuations); pairs where
    either score is NaN are skipped. Returns ``(wins, losses, ties)``.
    """
    a = np.asarray(scores, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores and baseline must be 1-D of the same length, got shapes {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    d = a[ok] - b[ok]
    ties = int((np.abs(d) <= tol).sum())
    wins = int((d > tol).sum())
    return wins, int(d.size) - wins - ties, ties


def win_rate(scores: Sequence[float], baseline: Sequence[float], tol: float = 1e-6) -> float:
    """DynaMo's win rate: ``wins / (wins + losses)``, ties excluded.

    Returns 0.5 (parity) when there is no decisive pair, e.g. a lossless method whose outputs equal
    the baseline's. Example: scores ``[2, 1, 3, 0]`` against ``[1, 1, 1, 1]`` -> 2 wins, 1 loss,
    1 tie -> ``2/3``.
    """
    wins, losses, _ = win_loss_tie(scores, baseline, tol)
    return PARITY_WIN_RATE if wins + losses == 0 else wins / (wins + losses)


def normalized_win_rate(rate: float) -> float:
    """``rate / 0.5``: 1.0 means parity with the baseline, 2.0 always better, 0.0 always worse."""
    return rate / PARITY_WIN_RATE


# ---------------------------------------------------------------- same-quality speed-up


@dataclass
class SameQuality:
    """Result of :func:`same_quality_speedup`.

    speedup : the same-quality speed-up (see the function).
    slope, intercept : the fitted line ``normalized_win_rate = intercept + slope * speedup``.
    crossing : where that line equals 1.0 (``inf``/``nan`` for a flat line), before capping.
    cap : ``min(max measured speed-up, max_speedup)``.
    n_points : sweep points used in the fit.
    """

    speedup: float
    slope: float
    intercept: float
    crossing: float
    cap: float
    n_points: int

    def to_dict(self) -> dict:
        return asdict(self)


def same_quality_speedup(speedups: Sequence[float], norm_win_rates: Sequence[float],
                         max_speedup: Optional[float] = None) -> SameQuality:
    """DynaMo's "same-quality speed-up" from one sweep (e.g. over ``eps_b``).

    Fit ``w(s) = intercept + slope * s`` by least squares to the points (speed-up ``s_i``, normalized
    win rate ``w_i``) (a constant, their mean, when fewer than two distinct speed-ups). The result
    is the largest speed-up ``s`` in ``[1, cap]`` with ``w(s) >= 1`` (quality at least at parity),
    where ``cap = min(max_i s_i, max_speedup)``; if no such ``s`` exists (the line is below parity
    over the whole range, or ``cap < 1``) the result is 1.0: at parity quality one can only run the
    baseline itself. With the usual falling line that is the crossing ``(1 - intercept) / slope``,
    clipped to ``[1, cap]``.

    Example: points (1, 1.2), (2, 1.0), (3, 0.8) give the line ``1.4 - 0.2 s``, crossing at 2.0.
    """
    s = np.asarray(speedups, dtype=np.float64)
    w = np.asarray(norm_win_rates, dtype=np.float64)
    if s.shape != w.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"speedups and norm_win_rates must be 1-D, non-empty, of the same length; "
                         f"got shapes {s.shape} and {w.shape}")
    ok = np.isfinite(s) & np.isfinite(w)
    s, w = s[ok], w[ok]
    if s.size == 0:
        return SameQuality(1.0, float("nan"), float("nan"), float("nan"), float("nan"), 0)
    if np.unique(s).size >= 2:
        slope, intercept = (float(v) for v in np.polyfit(s, w, 1))
        if abs(slope) < 1e-9:  # equal win rates: a flat line up to rounding
            slope, intercept = 0.0, float(w.mean())
    else:
        slope, intercept = 0.0, float(w.mean())
    cap = float(s.max()) if max_speedup is None else float(min(s.max(), max_speedup))
    crossing = (1.0 - intercept) / slope if slope != 0 else (float("inf") if intercept >= 1 else float("nan"))
    at_least_parity = lambda x: intercept + slope * x >= 1.0 - 1e-12  # noqa: E731
    if cap < 1.0:
        best = 1.0
    elif slope < 0:
        best = min(cap, crossing) if crossing >= 1.0 else 1.0
    else:  # flat or rising: parity holds at the cap or nowhere in [1, cap]
        best = cap if at_least_parity(cap) else 1.0
    return SameQuality(float(best), slope, intercept, float(crossing), cap, int(s.size))


# ---------------------------------------------------------------- valid Python

try:  # Python >= 3.11: the compiler tells "incomplete input" (more lines could fix it) from errors
    _INCOMPLETE_FLAGS = codeop.PyCF_ALLOW_INCOMPLETE_INPUT | codeop.PyCF_DONT_IMPLY_DEDENT
except AttributeError:  # older Pythons: recognise the incomplete-at-EOF messages instead
    _INCOMPLETE_FLAGS = None
_INCOMPLETE_MESSAGES = ("expected an indented block", "was never closed", "unterminated triple-quoted",
                        "unexpected EOF", "EOF while scanning", "EOF in multi-line")


def cut_at_last_line(text: str) -> str:
    """``text`` up to and including its last newline ("" when it has none)."""
    return text[:text.rfind("\n") + 1]


def syntax_status(source: str) -> Tuple[str, Optional[int], str]:
    """``("ok" | "incomplete" | "error", lineno, message)`` for a Python source text.

    "incomplete": not valid as is, but more lines could make it valid (an open block, bracket or
    triple-quoted string at the end); "error": no continuation can fix it (the first error's line).
    """
    try:
        ast.parse(source)
        return "ok", None, ""
    except (SyntaxError, ValueError) as err:  # ValueError: NUL bytes
        msg, line = str(getattr(err, "msg", err)), getattr(err, "lineno", None)
    if _INCOMPLETE_FLAGS is not None:
        try:
            compile(source, "<completion>", "exec", _INCOMPLETE_FLAGS)
        except SyntaxError as err:
            if err.msg == "incomplete input":
                return "incomplete", err.lineno, err.msg
            return "error", err.lineno, err.msg
        except ValueError:
            return "error", line, msg
        return "ok", None, ""  # pragma: no cover - ast.parse and compile agree on valid code
    if any(m in msg for m in _INCOMPLETE_MESSAGES):
        return "incomplete", line, msg
    return "error", line, msg


def is_valid_completion(context: str, completion: str) -> bool:
    """Whether ``completion`` continues the Python source ``context`` without a syntax error.

    The rule, in order (``context`` is the file's text up to the cut point; the model may have seen
    only its tail as the prompt):

    1. Cut the completion at its last complete line (a trailing partial line is dropped: the token
       budget, not the model, ended it). ``src = context + cut``.
    2. Valid if ``src`` parses (``ast.parse``).
    3. Valid if ``src`` is merely *incomplete* at its end — an open block (``if x:`` with no body
       yet), bracket or triple-quoted string that more lines could close — since generation stopped
       at ``max_new_tokens``. (Python >= 3.11 ``PyCF_ALLOW_INCOMPLETE_INPUT``; older: the
       compiler's end-of-input messages.) A context that ends mid-block, such as a function header
       and docstring with the body still to come, is therefore judged sensibly.
    4. If the context itself has a syntax error (not just incomplete), valid iff the first error of
       ``src`` lies inside the context's lines (the completion introduced no new error).
    5. Otherwise invalid.

    An empty cut completion is valid when the context is valid or incomplete (nothing was added).
    """
    src = context + cut_at_last_line(completion)
    status, line, _ = syntax_status(src)
    if status != "error":
        return True
    ctx_status, _, _ = syntax_status(context)
    if ctx_status == "error":
        n_context_lines = context.count("\n") + (0 if context.endswith("\n") or not context else 1)
        return line is not None and line <= n_context_lines
    return False


def valid_python_share(pairs: Iterable[Tuple[str, str]]) -> float:
    """Share of ``(context, completion)`` pairs that pass :func:`is_valid_completion` (NaN if none)."""
    flags = [is_valid_completion(c, x) for c, x in pairs]
    return float(np.mean(flags)) if flags else float("nan")


# ---------------------------------------------------------------- repetition and agreement


def distinct_n(tokens: Sequence, n: int) -> float:
    """Distinct-n: unique n-grams / n-grams in ``tokens`` (1.0 = no repetition).

    NaN when ``tokens`` has fewer than ``n`` items. Example: ``[1, 2, 1, 2]`` has bigrams
    (1,2), (2,1), (1,2) -> distinct-2 = 2/3.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seq = [int(t) for t in tokens]
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def line_exact_match(completion: str, reference: str) -> float:
    """Share of the completion's complete non-blank lines equal to the reference's non-blank line of
    the same rank.

    Only complete lines (ended by a newline) of the completion count; blank lines are skipped on both
    sides (so one extra blank line does not shift every later line, and blank lines never count as
    matches); lines are compared with trailing whitespace stripped (``\\r\\n`` = ``\\n``). 0.0 when
    the completion has no complete non-blank line. Example: ``"a\\n\\nb\\nc"`` against
    ``"a\\nx\\n"``: lines ``a``, ``b`` (``c`` is unfinished) vs ``a``, ``x`` -> 0.5.
    """
    lines = [x.rstrip() for x in cut_at_last_line(completion).splitlines() if x.strip()]
    if not lines:
        return 0.0
    ref = [x.rstrip() for x in reference.splitlines() if x.strip()]
    hits = sum(1 for i, line in enumerate(lines) if i < len(ref) and line == ref[i])
    return hits / len(lines)


def char_similarity(completion: str, reference: str) -> float:
    """``difflib.SequenceMatcher(None, completion, reference[:len(completion)]).ratio()``.

    The reference is cut to the completion's length so a short completion is not punished for the
    text it did not try to write; ``autojunk`` is off (it would ignore common characters such as
    spaces in code longer than 200 characters). An empty completion scores 0.0 (1.0 if the
    reference is empty too).
    """
    if not completion:
        return 1.0 if not reference else 0.0
    ref = reference[:len(completion)]
    return difflib.SequenceMatcher(None, completion, ref, autojunk=False).ratio()


def nanmean(values: Iterable[float]) -> float:
    """Mean ignoring NaN; NaN when nothing is left (no numpy warning)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")
