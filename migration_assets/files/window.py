"""The run window: when copying may happen. Pure; the clock is injected so tests can fix the time."""

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from migration_assets.files.settings import WindowSettings

Clock = Callable[[], datetime]
SATURDAY = 5


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


class RunWindow:
    def __init__(self, settings: WindowSettings, clock: Clock = system_clock) -> None:
        self.settings = settings
        self.zone = ZoneInfo(settings.tz)
        self.clock = clock

    def is_open(self, at: datetime | None = None) -> bool:
        if not self.settings.enabled:
            return True
        local = (at or self.clock()).astimezone(self.zone)
        if self.settings.weekends and local.weekday() >= SATURDAY:
            return True
        start, end, now = self.settings.start, self.settings.end, local.time()
        if start <= end:  # a window within one day, e.g. 09:00-17:00
            return start <= now < end
        return now >= start or now < end  # crossing midnight, e.g. 22:00-06:00

    def next_open(self, at: datetime | None = None) -> datetime | None:
        """The moment the window next opens (`at` itself when open now); None if it never does
        (an empty nightly window without weekends)."""
        at = at or self.clock()
        if self.is_open(at):
            return at
        local = at.astimezone(self.zone)
        candidates = []
        for days in range(8):  # the window opens at `start` on some day of the next week
            day = (local + timedelta(days=days)).date()
            candidates.append(datetime.combine(day, self.settings.start, self.zone))
            if self.settings.weekends and day.weekday() == SATURDAY:
                candidates.append(datetime.combine(day, datetime.min.time(), self.zone))
        return min((c for c in candidates if c > local and self.is_open(c)), default=None)

    def describe(self) -> str:
        s = self.settings
        if not s.enabled:
            return "run window disabled (always open)"
        weekends = " plus weekends" if s.weekends else ""
        return f"{s.start:%H:%M}-{s.end:%H:%M}{weekends} in {s.tz}"

    def closed_message(self) -> str:
        opens = self.next_open()
        when = (f"it opens at {opens.astimezone(self.zone):%Y-%m-%d %H:%M %Z}" if opens else
                "it never opens with these settings (FILES_RUN_WINDOW_START/END/WEEKENDS)")
        return (f"outside the run window ({self.describe()}); {when}. "
                "Run then, or pass --ignore-window / set FILES_RUN_WINDOW_ENABLED=false to run now")
