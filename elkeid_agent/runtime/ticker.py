"""When a periodic timer fires next, as a pure object fed the clock.

A timer that adds its interval to the last due time catches up after a
stall (the host suspended, the process SIGSTOPped for ten minutes) by
firing once per missed tick, back to back: ten minutes of heartbeats in a
burst. ``Ticker`` fires once on the first look after a stall and schedules
the next tick one interval from then; on time it keeps the regular grid, so
its period does not drift by the loop's own latency.
"""


class Ticker:
    def __init__(self, interval, now):
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.next = now  # the first tick is due at once

    def due(self, now):
        """True when the tick is due at ``now``; then the next one is
        scheduled (missed ticks are skipped, not made up)."""
        if now < self.next:
            return False
        self.next += self.interval
        if self.next <= now:
            self.next = now + self.interval
        return True
