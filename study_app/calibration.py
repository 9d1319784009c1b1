"""Display calibration: a study's display requirements and the pure geometry behind them.

Before the trials a participant may calibrate their display (docs/participant_pages.md):

* the **credit-card method**: they resize an outline on the screen until it matches a
  real ID-1 card (ISO/IEC 7810, 85.60 × 53.98 mm), so the outline's width in CSS pixels
  over 85.60 mm gives CSS pixels per millimetre;
* the **blind-spot method** (the "virtual chinrest", Li et al. 2020, Sci. Rep. 10:904):
  with the right eye closed they fixate a square while a dot moves left, and press a key
  when it disappears; the optic disc sits about 13.5° temporal of the fovea, so the
  fixation-to-dot distance ``s`` (mm) gives the viewing distance ``d = s / tan(13.5°)``,
  and the central degree spans ``2 d tan(0.5°)`` mm, i.e. that many mm × px/mm pixels.

A study's :class:`DisplayRequirements` say whether the step is shown and what a display
must satisfy; :func:`check_display` is the server's verdict on what the page reports.
Every function here is pure (numbers in, numbers out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CARD_WIDTH_MM = 85.60  # ISO/IEC 7810 ID-1 (credit card)
CARD_HEIGHT_MM = 53.98
BLIND_SPOT_DEG = 13.5  # horizontal eccentricity of the blind spot's centre (Li et al. 2020)
CALIBRATION_MODES = ("off", "optional", "required")
# What counts as "100 %" browser zoom: the page's estimate within this relative tolerance.
ZOOM_TOLERANCE = 0.05
# How far from an integer a devicePixelRatio may be and still count as unscaled.
DPR_TOLERANCE = 1e-3


class RequirementsError(ValueError):
    """An invalid ``calibration`` setting; the message names it and the allowed values."""


@dataclass(frozen=True)
class DisplayRequirements:
    """A study's display calibration settings (the ``calibration`` mapping of its config).

    ``mode``: ``off`` (no card step), ``optional`` (shown, may be skipped) or ``required``;
    ``viewing_distance``: the blind-spot step after the card, ``off`` / ``optional`` /
    ``required``; ``min_px_per_deg``: the fewest CSS pixels per degree of visual angle a
    participant's display may give (needs both steps required); ``require_unscaled``:
    refuse a browser zoom other than 100 % and a fractional devicePixelRatio (the
    stimuli would be resampled); ``require_fullscreen``: trials only in fullscreen
    (leaving it pauses the study).
    """

    mode: str = "off"
    viewing_distance: str = "optional"
    min_px_per_deg: float | None = None
    require_unscaled: bool = False
    require_fullscreen: bool = False

    @property
    def check_needed(self) -> bool:
        """Whether the page must report the display before the trials (and the server
        refuses trials until a report passes)."""
        return self.mode == "required" or self.min_px_per_deg is not None or self.require_unscaled

    @property
    def step_shown(self) -> bool:
        """Whether the page runs the display step at all."""
        return self.mode != "off" or self.check_needed

    def to_public(self) -> dict[str, Any]:
        """What the participant page needs to know (all of it: nothing here is secret)."""
        return {
            "mode": self.mode,
            "viewing_distance": self.viewing_distance,
            "min_px_per_deg": self.min_px_per_deg,
            "require_unscaled": self.require_unscaled,
            "require_fullscreen": self.require_fullscreen,
            "card_mm": [CARD_WIDTH_MM, CARD_HEIGHT_MM],
            "blind_spot_deg": BLIND_SPOT_DEG,
        }


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RequirementsError(message)


def parse_requirements(data: Any) -> DisplayRequirements:
    """Validate the ``calibration`` mapping of a study config (None: all defaults)."""
    if data is None:
        return DisplayRequirements()
    _check(
        isinstance(data, dict),
        "'calibration' must be a mapping of setting -> value "
        "(mode, viewing_distance, min_px_per_deg, require_unscaled, require_fullscreen)",
    )
    known = set(DisplayRequirements.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    _check(not unknown, f"unknown calibration setting(s) {unknown}; known: {sorted(known)}")
    req = DisplayRequirements(**data)
    for name in ("mode", "viewing_distance"):
        _check(
            getattr(req, name) in CALIBRATION_MODES,
            f"calibration '{name}' must be one of {list(CALIBRATION_MODES)}, "
            f"got {getattr(req, name)!r}",
        )
    for name in ("require_unscaled", "require_fullscreen"):
        _check(isinstance(getattr(req, name), bool), f"calibration '{name}' must be true or false")
    value = req.min_px_per_deg
    if value is not None:
        _check(
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 1 <= value <= 1000,
            "calibration 'min_px_per_deg' must be a number of CSS pixels per degree in "
            f"[1, 1000] or null, got {value!r}",
        )
        _check(
            req.mode == "required" and req.viewing_distance == "required",
            "calibration 'min_px_per_deg' needs mode: required and viewing_distance: "
            "required (pixels per degree come from the card and the blind-spot steps)",
        )
    return req


def px_per_mm(card_width_px: float) -> float:
    """CSS pixels per millimetre from the matched card outline's width (CSS px)."""
    return card_width_px / CARD_WIDTH_MM


def viewing_distance_mm(blind_spot_px: float, px_mm: float) -> float:
    """Viewing distance (mm) from the fixation-to-blind-spot distance (CSS px) at
    ``px_mm`` CSS px per mm: ``s / tan(13.5°)``."""
    return (blind_spot_px / px_mm) / math.tan(math.radians(BLIND_SPOT_DEG))


def px_per_degree(px_mm: float, distance_mm: float) -> float:
    """CSS pixels spanned by the central degree of visual angle at ``distance_mm``:
    ``2 d tan(0.5°) × px/mm``."""
    return 2.0 * distance_mm * math.tan(math.radians(0.5)) * px_mm


def unscaled(device_pixel_ratio: float, zoom_estimate: float | None) -> bool:
    """Whether the stimuli are drawn unscaled: an integer devicePixelRatio and a browser
    zoom of 100 % (within ZOOM_TOLERANCE; an unknown zoom is judged by the ratio alone)."""
    integer = abs(device_pixel_ratio - round(device_pixel_ratio)) <= DPR_TOLERANCE
    zoom_ok = zoom_estimate is None or abs(zoom_estimate - 1.0) <= ZOOM_TOLERANCE
    return integer and round(device_pixel_ratio) >= 1 and zoom_ok


@dataclass(frozen=True)
class DisplayReport:
    """What the page measured (CSS pixels; None where a step was skipped)."""

    device_pixel_ratio: float
    screen_w: int
    screen_h: int
    zoom_estimate: float | None = None
    card_width_px: float | None = None
    blind_spot_px: float | None = None


@dataclass(frozen=True)
class DisplayVerdict:
    """The server's reading of a :class:`DisplayReport` against the requirements.

    ``problems`` are ``(code, message)`` pairs, empty when the display passes.
    """

    px_per_mm: float | None
    viewing_distance_mm: float | None
    px_per_deg: float | None
    scaling_ok: bool
    problems: tuple[tuple[str, str], ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def check_display(report: DisplayReport, req: DisplayRequirements) -> DisplayVerdict:
    """Derive px/mm, viewing distance and px/deg from ``report`` and list what fails
    ``req`` (the participant can fix each and try again)."""
    px_mm = px_per_mm(report.card_width_px) if report.card_width_px is not None else None
    distance = deg = None
    if px_mm is not None and report.blind_spot_px is not None:
        distance = viewing_distance_mm(report.blind_spot_px, px_mm)
        deg = px_per_degree(px_mm, distance)
    scaling_ok = unscaled(report.device_pixel_ratio, report.zoom_estimate)
    problems = []
    if req.require_unscaled and not scaling_ok:
        problems.append(
            (
                "display_scaled",
                f"the page is scaled (devicePixelRatio {report.device_pixel_ratio:g}"
                + (
                    f", zoom about {100 * report.zoom_estimate:.0f} %"
                    if report.zoom_estimate is not None
                    else ""
                )
                + "): set the browser zoom to 100 % and the system display "
                "scaling to 100 % or 200 %",
            )
        )
    if req.min_px_per_deg is not None and deg is not None and deg < req.min_px_per_deg:
        problems.append(
            (
                "too_few_px_per_deg",
                f"{deg:.1f} pixels per degree, fewer than the {req.min_px_per_deg:g} "
                "this study needs: sit farther from the screen",
            )
        )
    return DisplayVerdict(
        px_per_mm=px_mm,
        viewing_distance_mm=distance,
        px_per_deg=deg,
        scaling_ok=scaling_ok,
        problems=tuple(problems),
    )
