"""A custom reward that kills its own worker process on demand (for the RewardService crash tests)."""
import os
from pathlib import Path


def score(prompt, response, reference, **kwargs):
    if response == "CRASH":  # every time
        os._exit(1)
    if response.startswith("CRASH_ONCE:"):  # the first time only: the marker file remembers
        marker = Path(response.split(":", 1)[1])
        if not marker.exists():
            marker.write_text("crashed")
            os._exit(1)
        return 1.0
    return float(response == reference)
