"""A training regime as a value: which of the three phases run, and the paper's names for them.

A regime is three phase flags, written as a phase string over ``+``/``-``
(character ``p`` says whether phase ``p`` runs; the phases themselves are the
table of ``earlyexit.training.phases``). The paper names three of them:

| name       | phases | what it trains                                              |
|------------|--------|-------------------------------------------------------------|
| joint      | ``-+-``  | phase 2 only: every exit together, from scratch            |
| disjoint   | ``+-+``  | phase 1 (backbone), then phase 3 (ICs on the frozen backbone) |
| mixed      | ``++-``  | phase 1, then phase 2                                      |

Any other string of three flags ("+++", "-++") is a regime too, except
``"---"`` (nothing to train). ``Regime.parse`` reads a name or a phase string;
everything else asks the value (``runs(p)``, ``after_phase1()``, ``name``)
instead of slicing strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

NAMES: dict[str, str] = {"joint": "-+-", "disjoint": "+-+", "mixed": "++-"}  # the paper's order
PHASE_NUMBERS = (1, 2, 3)


@dataclass(frozen=True)
class Regime:
    phases: str  # the phase string: 3 characters over "+"/"-", character p says whether phase p runs

    def __post_init__(self) -> None:
        if not (isinstance(self.phases, str) and len(self.phases) == 3 and set(self.phases) <= {"+", "-"}):
            raise ConfigError(f"unknown regime {self.phases!r}; valid: {', '.join(NAMES)} or a 3-character phase "
                              "string over +/- (e.g. '+-+')")
        if self.phases == "---":
            raise ConfigError("phase string '---' runs no phase; enable at least one of the three")

    @classmethod
    def parse(cls, value: str | Regime) -> Regime:
        """The regime of a name (``"mixed"``) or a phase string (``"++-"``); a ``Regime`` is returned as it is.

        Raises:
            ConfigError: neither a name nor a phase string, or ``"---"``.
        """
        if isinstance(value, Regime):
            return value
        if isinstance(value, str) and value in NAMES:
            return cls(NAMES[value])
        return cls(value)

    @classmethod
    def try_parse(cls, value: str | Regime) -> Regime | None:
        """``parse``, or None where ``value`` is no regime."""
        try:
            return cls.parse(value)
        except ConfigError:
            return None

    @classmethod
    def of(cls, *phases: int) -> Regime:
        """The regime that runs exactly ``phases``, e.g. ``Regime.of(3)`` (phase 3 alone: ``"--+"``)."""
        bad = [p for p in phases if p not in PHASE_NUMBERS]
        if bad:
            raise ValueError(f"phase must be 1, 2 or 3, got {bad[0]!r}")
        return cls("".join("+" if p in phases else "-" for p in PHASE_NUMBERS))

    @staticmethod
    def display(text: str) -> str:
        """The name of a phase string the table names (``"-+-"`` -> ``"joint"``); any other text unchanged
        (phase strings read from foreign files, names already)."""
        return next((name for name, phases in NAMES.items() if phases == text), text)

    def runs(self, phase: int) -> bool:
        """Whether phase ``phase`` (1, 2 or 3) runs."""
        if phase not in PHASE_NUMBERS:
            raise ValueError(f"phase must be 1, 2 or 3, got {phase!r}")
        return self.phases[phase - 1] == "+"

    @property
    def run_phases(self) -> tuple[int, ...]:
        """The phases that run, in order, e.g. ``(1, 3)`` for disjoint."""
        return tuple(p for p in PHASE_NUMBERS if self.runs(p))

    @property
    def name(self) -> str:
        """The table's name (``"mixed"``), else the phase string."""
        return self.display(self.phases)

    @property
    def starts_from_phase1(self) -> bool:
        """Whether phase 1 runs first: the regime can continue a phase 1 trained once and shared (disjoint, mixed)."""
        return self.runs(1)

    @property
    def trains_backbone(self) -> bool:
        """Whether phase 1 or 2 trains the backbone; without them (``"--+"``) a trained backbone must be given."""
        return self.runs(1) or self.runs(2)

    def after_phase1(self) -> Regime:
        """The phases left once phase 1 is done (mixed: ``"-+-"``); what continues a shared phase 1.

        Raises:
            ConfigError: nothing runs after phase 1 (``"+--"``).
        """
        return Regime("-" + self.phases[1:])

    @property
    def slug(self) -> str:
        """The phase string spelt for file names, ``+`` as ``p`` and ``-`` as ``m`` (``"++-"`` -> ``"ppm"``)."""
        return self.phases.replace("+", "p").replace("-", "m")

    def __str__(self) -> str:
        return self.phases


__all__ = ["Regime", "NAMES"]
