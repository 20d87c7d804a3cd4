"""The student's input size, one size or a schedule of sizes (progressive resizing): `--student-size 128:0.7,224`
trains at 128 px for the first 70% of the epochs, then at 224 px, where it is evaluated and saved.

Why a schedule: a student step at 128 px costs about a third of one at 224 px on a CPU, and a student trained at a
low resolution then finished at the full one keeps most of the full resolution's accuracy (fast.ai's progressive
resizing, FFCV's ImageNet recipes, EfficientNetV2's progressive learning; FixRes, Touvron et al. 2019, on why the
last phase must be at the size the student is tested at). The cache stores each view's source, so every size is the
same crop and the teacher's logits stay valid at each of them."""

import math

from kdcache.errors import KdcacheError

SCHEDULE_FORM = "SIZE, or SIZE:UNTIL,...,SIZE (e.g. 128:0.7,224: 128 px for the first 70% of the epochs, then 224)"
SMALLEST = 16


def parse_student_size(value):
    """--student-size as the options hold it: None, one size (an int), or a schedule as canonical text
    ('128:0.7,224'); anything else refused in one line."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, bool):
        raise _malformed(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return _size(int(value), value)
    phases = size_schedule(str(value))
    return (
        phases[0][0]
        if len(phases) == 1
        else ",".join(f"{size}:{until:g}" if until < 1 else str(size) for size, until in phases)
    )


def size_schedule(value) -> list[tuple[int, float]]:
    """[(size, until)]: each size with the share of the epochs at whose end it stops (the last one's is 1), from
    None (nothing: []), an int or the schedule's text; refused in one line when malformed, when its shares do not
    rise, or when it ends below a size it trained at (the student is evaluated and saved at the last size)."""
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [(_size(value, value), 1.0)]
    text = str(value).strip()
    parts = [part.strip() for part in text.split(",")]
    phases, previous = [], 0.0
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        size_text, colon, until_text = part.partition(":")
        if bool(colon) == last:  # every size but the last says until when
            raise _malformed(value)
        size = _size(_integer(size_text, value), value)
        until = 1.0 if last else _share(until_text, value)
        if not previous < until <= 1.0 or (not last and until >= 1.0):
            raise KdcacheError(
                f"--student-size '{text}': each UNTIL must be a share of the epochs above the one before it and "
                f"below 1 (e.g. 128:0.7,224); form: {SCHEDULE_FORM}"
            )
        phases.append((size, until))
        previous = until
    final = phases[-1][0]
    if any(size > final for size, _ in phases):
        raise KdcacheError(
            f"--student-size '{text}' ends at {final} px, below the {max(size for size, _ in phases)} px it trains at "
            f"before; the student is validated and saved at the last size, so end with the largest "
            f"(e.g. {min(size for size, _ in phases)}:0.7,{max(size for size, _ in phases)})"
        )
    return phases


def final_size(value) -> int | None:
    """The size the student is evaluated and saved at: the schedule's last (None: the teacher's)."""
    phases = size_schedule(value)
    return phases[-1][0] if phases else None


def epoch_phases(value, epochs: int) -> list[int]:
    """The phase (position in the schedule) of each of `epochs` epochs: an epoch trains at the size whose share of
    the epochs holds its middle, so the size changes only at an epoch boundary, the nearest one to its UNTIL."""
    phases = size_schedule(value)
    return [
        next(i for i, (_, until) in enumerate(phases) if (epoch + 0.5) / epochs < until) for epoch in range(epochs)
    ]


def epoch_sizes(value, epochs: int) -> list[int]:
    """The student's input size in each of `epochs` epochs."""
    phases = size_schedule(value)
    return [phases[phase][0] for phase in epoch_phases(value, epochs)]


def check_every_size_trains(value, epochs) -> None:
    """Refuse a schedule that leaves one of its sizes without an epoch (e.g. 128:0.02,224 over 20 epochs)."""
    phases = size_schedule(value)
    if len(phases) < 2:
        return
    count = math.ceil(epochs)
    trained = set(epoch_phases(value, count))
    for position, (size, _) in enumerate(phases):
        if position not in trained:
            raise KdcacheError(
                f"--student-size '{value}' gives {size} px no epoch of the {count}; move its UNTIL or train for "
                "more --epochs"
            )


def _integer(text: str, value) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _malformed(value) from None


def _share(text: str, value) -> float:
    try:
        share = float(text)
    except ValueError:
        raise _malformed(value) from None
    if not math.isfinite(share):
        raise _malformed(value)
    return share


def _size(size: int, value) -> int:
    if size < SMALLEST:
        raise KdcacheError(
            f"--student-size {value}: {size} px is too small; give the student's input side in pixels (e.g. 128)"
        )
    return size


def _malformed(value) -> KdcacheError:
    return KdcacheError(f"--student-size '{value}' is not {SCHEDULE_FORM}")
