"""The status of one pipeline, and how it reads as markdown (asset metadata) or plain text (terminal)."""

from dataclasses import dataclass, field


@dataclass
class FailureGroup:
    """Failing items sharing an error kind and host: one line however many items fail alike."""

    kind: str       # the error's class, e.g. "DidResolutionFailed" ("error" when the message names none)
    host: str       # the host the error names, else the item's own host ("" when none)
    count: int
    example: str    # one failing item (DID, partition, file)
    reason: str     # that item's message

    @property
    def label(self) -> str:
        return f"{self.count} x {self.kind}" + (f" at {self.host}" if self.host else "")


@dataclass
class PipelineStatus:
    pipeline: str
    unit: str                      # what `done` / `total` count: "block ranges", "repos", ...
    done: int
    total: int
    per_hour: float = 0.0          # units finished in the last hour
    throughput: str = ""           # the work's own rate, e.g. "950 heights/s"
    failures: list[FailureGroup] = field(default_factory=list)      # most items first
    failure_count: int = 0         # failing items, all groups
    slowest: list[tuple[str, float]] = field(default_factory=list)  # (item, seconds)
    stuck: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    @property
    def eta_hours(self) -> float | None:
        remaining = self.total - self.done
        if remaining <= 0:
            return 0.0
        return remaining / self.per_hour if self.per_hour > 0 else None


def eta_text(status: PipelineStatus) -> str:
    eta = status.eta_hours
    if eta is None:
        return "unknown (nothing finished in the last hour)"
    if eta == 0:
        return "done"
    return f"{eta * 60:.0f} min" if eta < 1 else f"{eta:.1f} h"


def summary_line(status: PipelineStatus) -> str:
    line = (f"{status.pipeline}: {status.done}/{status.total} {status.unit} ({status.percent:.1f}%), "
            f"{status.per_hour:.0f}/h, ETA {eta_text(status)}")
    if status.throughput:
        line += f", {status.throughput}"
    if status.failure_count:
        line += f", {status.failure_count} failing"
    if status.stuck:
        line += f", {len(status.stuck)} stuck"
    return line


def markdown(statuses: list[PipelineStatus]) -> str:
    rows = ["| pipeline | done | total | % | per hour | ETA | throughput | failing | stuck |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows += [
        f"| {s.pipeline} | {s.done} | {s.total} {s.unit} | {s.percent:.1f} | {s.per_hour:.0f} | {eta_text(s)} "
        f"| {s.throughput or '-'} | {s.failure_count} | {len(s.stuck)} |"
        for s in statuses
    ]
    return "\n".join(rows)


def failures_markdown(statuses: list[PipelineStatus]) -> str:
    rows = [(s.pipeline, group) for s in statuses for group in s.failures]
    if not rows:
        return "no failures"
    lines = ["| pipeline | items | kind | host | example | its reason |", "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {g.count} | {g.kind} | {g.host or '-'} | {g.example} | {g.reason[:300].replace('|', '/')} |"
              for p, g in rows]
    return "\n".join(lines)


def slowest_markdown(statuses: list[PipelineStatus]) -> str:
    rows = [(s.pipeline, item, seconds) for s in statuses for item, seconds in s.slowest]
    stuck = [(s.pipeline, item) for s in statuses for item in s.stuck]
    lines = ["| pipeline | item | seconds |", "|---|---|---|"] + [f"| {p} | {i} | {sec:.1f} |" for p, i, sec in rows]
    if stuck:
        lines += ["", "**stuck:**", ""] + [f"- {p}: {item}" for p, item in stuck]
    return "\n".join(lines)


def text(statuses: list[PipelineStatus]) -> str:
    out = []
    for status in statuses:
        out.append(summary_line(status))
        for group in status.failures[:10]:
            out.append(f"  failed   {group.label}, e.g. {group.example}: {group.reason[:200]}")
        for item in status.stuck[:10]:
            out.append(f"  stuck    {item}")
        for item, seconds in status.slowest[:3]:
            out.append(f"  slowest  {item}: {seconds:.1f} s")
    return "\n".join(out)
