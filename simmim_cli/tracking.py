"""What a run records: ``metrics.jsonl`` in the run folder (rank 0 only), one JSON object per logged row."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Appends rows to ``<output>/metrics.jsonl``; does nothing on ranks other than 0."""

    def __init__(self, output: Path, enabled: bool):
        self.path = output / "metrics.jsonl"
        self.enabled = enabled

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops rows a crashed run logged after its last checkpoint, so the resumed run does not repeat them."""
        if not (self.enabled and self.path.is_file()):
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(row + "\n" for row in rows))
        tmp.replace(self.path)

    def close(self) -> None:
        """Nothing to flush for the JSON lines file; trackers hook in here."""
