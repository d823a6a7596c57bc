"""One place per setting: a stage dataclass declares each field's default, flag, help and bounds
together (``setting``), and checks its own fields when it is made (``Checked``).

    @dataclass
    class MIConfig(Checked):
        bins: int = setting(256, flag="--bins", help="MI grey levels", least=2, most=256)

The CLI's options (flag, type, default, choices, help) are read from these declarations
(``cli.add_flags``), and every refusal is a one-line ValueError naming the setting and what to do
(the CLI and ``--config`` put the flag or the ``config.json`` path in front). Checks that need
more than one field or a look at the disk stay in the runs' ``check`` methods (``config.py``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

SEED_MAX = 2**32 - 1  # seeds: numpy's and torch's common range


def setting(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, flag: str | None = None, help: str = "",
            least=None, most=None, above=None, choices=None, fix: str = "", repr: bool = True):
    """A dataclass field with its CLI flag (``"--budget -k"``: the flag, then its aliases; None:
    ``config.json`` only), help text and bounds: ``least``/``most`` (ints: least defaults to 1;
    floats: ``above`` for a strict lower bound), ``choices`` (a sequence, or a function that
    returns one, called at each check: a registry that grows or is replaced is seen), ``fix`` (what to do, appended to a refusal)."""
    metadata = {"flag": flag, "help": help, "least": least, "most": most, "above": above, "choices": choices,
                "fix": fix}
    return dataclasses.field(default=default, default_factory=factory, repr=repr, metadata=metadata)


def choices_of(f: dataclasses.Field):
    """A field's declared choices now (None: any value of its type)."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def kind_of(f: dataclasses.Field) -> tuple[str, bool]:
    """A field's type as ``("int", none_ok)``: its annotation's first member and whether ``None`` is allowed."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    members = [m.strip() for m in text.split("|")]
    return members[0], "None" in members[1:]


def check_fields(obj) -> None:
    """Check every declared bound of ``obj``'s own fields (a nested stage checked itself when it was made)."""
    for f in dataclasses.fields(obj):
        meta, value = f.metadata, getattr(obj, f.name)
        if not meta or dataclasses.is_dataclass(value):
            continue
        kind, none_ok = kind_of(f)
        if value is None and none_ok:
            continue
        if meta["choices"] is not None:
            check_choice(f.name, value, choices_of(f))
        elif kind == "bool":
            check_bool(f.name, value)
        elif kind == "int":
            least = 1 if meta["least"] is None else meta["least"]
            check_int(f.name, value, minimum=least, maximum=meta["most"], fix=meta["fix"])
        elif kind == "float":
            check_number(f.name, value, above=meta["above"], at_least=meta["least"], at_most=meta["most"],
                         fix=meta["fix"])


class Checked:
    """A stage dataclass that checks its declared bounds when it is made (and when ``replace``d)."""

    def __post_init__(self):
        check_fields(self)


def check_int(option: str, value, *, minimum: int = 1, maximum: int | None = None, none_ok: bool = False,
              fix: str = "") -> None:
    """``value`` is an int (not a bool) in ``minimum..maximum``, or None when ``none_ok``."""
    if value is None and none_ok:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        if minimum == 1:
            want = "a positive integer" + (f" up to {maximum:,}" if maximum is not None else "")
        else:
            want = f"an integer in {minimum}..{maximum:,}" if maximum is not None else f"an integer >= {minimum}"
        raise ValueError(f"{option} must be {want}, got {value!r}" + (f"; {fix}" if fix else ""))


def check_number(option: str, value, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None, none_ok: bool = False, fix: str = "") -> None:
    """``value`` is a finite real number (not a bool, NaN or infinity) with ``value > above``, ``>= at_least``,
    ``<= at_most``, or None when ``none_ok``."""
    if value is None and none_ok:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    if not ok:
        lower = f"> {above:g}" if above is not None else f">= {at_least:g}" if at_least is not None else ""
        upper = f"<= {at_most:g}" if at_most is not None else ""
        want = " and ".join(x for x in (lower, upper) if x) or "a number"
        raise ValueError(f"{option} must be a number {want}, got {value!r}" + (f"; {fix}" if fix else ""))


def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_bool(option: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be true or false, got {value!r}")
