"""rewind_metrics: a resume from step N moves the rows logged after N aside (they are replayed) and keeps the rest."""
import json

from launch.metrics import METRICS_FILE, read_metrics, rewind_metrics


def test_rewind_moves_later_rows_aside(tmp_path):
    rows = [{"step": s, "reward": s / 10} for s in (1, 2, 3, 4)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rewind_metrics(tmp_path, 2) == 2
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2]
    moved = [json.loads(line) for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in moved] == [3, 4]
    assert rewind_metrics(tmp_path, 2) == 0  # nothing later any more
