"""Stop signals: remembered, never raised, so training can checkpoint at the next step all ranks agree on."""

from __future__ import annotations

import signal


class StopRequest:
    """Remembers a SIGTERM/SIGINT/SIGUSR1 so training can checkpoint at the next agreed step."""

    def __init__(self):
        self.signum = 0
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        # Ctrl-C under a launcher delivers SIGINT and then the launcher's SIGTERM: keep the first,
        # never raise, so the checkpoint is written; the launcher kills us if we take too long.
        self.signum = self.signum or signum
