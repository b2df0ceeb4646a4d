"""The one exception type users see (its public name is ``zsad.ZSADError``).

It lives in ``zsad/modeling/`` because the Hub's remote-code loader ships only this folder
with a checkpoint, and the modeling code must raise it too.
"""


class ZSADError(ValueError):
    """A problem the user can fix: bad input, wrong checkpoint, missing data. The message says how."""
