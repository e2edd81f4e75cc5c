"""Calling a reward function safely: what it must accept, what it must return, and one line when it does not.

A reward is the user's code inside the training step. Whatever it does wrong
(raises, returns the wrong number of values, None, strings, NaN or inf) must
stop the step with one line that names the reward, says what it returned and
what is expected, before a single non-finite number reaches the advantages,
the loss or the weights.
"""

from __future__ import annotations

import inspect
import math
import numbers

from twophase.data.base.errors import UserError, reason_of

SIGNATURE = "fn(tasks, completions, *, step, rows=None) -> list of len(completions) finite floats"


class CheckedReward:
    """`fn` called as a reward: its signature checked when built, its every answer checked when called."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn
        if not accepts_keyword(fn, "step"):
            raise UserError(f"reward {name} does not take the keyword `step`; a reward is {SIGNATURE}")

    def __call__(self, tasks, completions, **keywords):
        try:
            values = self.fn(tasks, completions, **keywords)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's code: any failure is one line, not their traceback
            raise UserError(f"reward {self.name} raised {reason_of(err)[:250]}") from None
        return checked_values(self.name, values, len(completions))

    def __getattr__(self, attribute):  # the reward's own `details` and `close`, if it has them
        return getattr(self.fn, attribute)


def checked_values(name: str, values, expected: int) -> list[float]:
    """`values` as floats, or a UserError naming the reward, the offending rows and values, and what is expected."""
    if hasattr(values, "tolist"):  # a numpy array or a tensor
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise UserError(f"reward {name} returned {_shown(values)}, not a list; a reward is {SIGNATURE}")
    if len(values) != expected:
        raise UserError(f"reward {name} returned {len(values)} values for {expected} completions; a reward is {SIGNATURE}")
    wrong = [(row, value) for row, value in enumerate(values)
             if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)]  # fmt: skip
    if wrong:
        shown = ", ".join(f"row {row}: {_shown(value)}" for row, value in wrong[:4]) + (", ..." if len(wrong) > 4 else "")
        raise UserError(f"reward {name} returned {len(wrong)} value(s) that are not finite numbers ({shown}); "
                        f"a reward is {SIGNATURE}")  # fmt: skip
    return [float(value) for value in values]


def accepts_keyword(fn, name: str) -> bool:
    """Whether `fn` can be called with keyword `name` (a callable whose signature Python cannot read: assume so)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
