"""TrajectoryStore: append-only Parquet per add, readable with `datasets`, nothing held in memory, resumable cursor."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from rl.sample import ScoredSample
from rl.store import StoreError, TrajectoryStore, read_store
from rollout.trajectory import Trajectory


def _traj(version: int, i: int, length: int = 4) -> ScoredSample:
    t = Trajectory(
        prompt_ids=torch.tensor([5, 6, 7]), response_ids=torch.arange(length) + 10,
        step_map=torch.arange(length) // 2, logprobs=torch.full((length,), -0.5), confidence=torch.ones(length),
        valid_length=length - 1, nfe=2, finish_reason="eos", block_size=2, sampling={"temperature": 1.0, "seed": i},
        policy_version=version, request_id=f"v{version}-r{i}",
    )
    return ScoredSample(t, reward=float(i % 2), reason="correct" if i % 2 else "wrong", advantage=0.25,
                        response_text=f"text {i}", prompt_index=i // 2, sample_index=i % 2,
                        reward_metrics={"digits_right": 1.0}, keep=True)


def test_rows_round_trip_through_datasets(tmp_path):
    store = TrajectoryStore(tmp_path / "store")
    store.add(1, [_traj(0, i) for i in range(4)])
    store.add(2, [_traj(1, i) for i in range(2)])
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert files == ["step_000001.parquet", "step_000002.parquet"]
    ds = read_store(tmp_path / "store")
    assert ds.num_rows == 6
    row = ds[1]
    assert row["step"] == 1 and row["version"] == 0 and row["request_id"] == "v0-r1"
    assert row["prompt_ids"] == [5, 6, 7] and row["response_ids"] == [10, 11, 12, 13]
    assert row["step_map"] == [0, 0, 1, 1] and row["logprobs"] == [-0.5] * 4
    assert row["reward"] == 1.0 and row["reason"] == "correct" and row["response_text"] == "text 1"
    assert row["advantage"] == 0.25 and row["prompt_index"] == 0 and row["sample_index"] == 1
    assert row["reward_metrics"] == '{"digits_right": 1.0}' and row["finish_reason"] == "eos"
    assert ds[5]["version"] == 1 and ds[5]["step"] == 2


def test_nothing_is_held_in_memory(tmp_path):
    store = TrajectoryStore(tmp_path)
    for version in range(4):
        store.add(version + 1, [_traj(version, i) for i in range(2)])
    assert store.summary() == {"files": 4, "rows": 8}  # everything is on disk
    assert not any(isinstance(v, (list, dict)) and v for k, v in vars(store).items() if k != "_files")


def test_same_step_twice_gets_a_part_file_and_reads_in_order(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.add(3, [_traj(0, 0)])
    store.add(3, [_traj(0, 1)])
    assert [p.name for p in store.files()] == ["step_000003.parquet", "step_000003-1.parquet"]
    assert read_store(tmp_path)["request_id"] == ["v0-r0", "v0-r1"]


def test_cursor_rewind_moves_later_files_aside(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.add(1, [_traj(0, 0)])
    cursor = store.state_dict()
    store.add(2, [_traj(1, 0)])
    # A new process (resume) opens the same directory and rewinds to the checkpoint's cursor.
    reopened = TrajectoryStore(tmp_path)
    assert reopened.summary()["rows"] == 2
    moved = reopened.load_state_dict(cursor)
    assert moved == ["step_000002.parquet"]
    assert (tmp_path / "superseded" / "step_000002.parquet").is_file()
    reopened.add(2, [_traj(1, 1)])
    assert read_store(tmp_path)["request_id"] == ["v0-r0", "v1-r1"]
    with pytest.raises(StoreError, match="step_000009.parquet"):
        reopened.load_state_dict({"files": ["step_000009.parquet"]})


def test_write_is_atomic_and_stale_temp_files_are_cleaned(tmp_path):
    (tmp_path / ".step_000001.parquet.tmp").write_bytes(b"half a file")
    store = TrajectoryStore(tmp_path)
    assert not (tmp_path / ".step_000001.parquet.tmp").exists()
    name = store.add(1, [_traj(0, 0)])
    assert pq.read_metadata(tmp_path / name).num_rows == 1
    assert not list(tmp_path.glob(".*"))



def test_step_records_round_trip(tmp_path):
    """MDPO's optional per-step fields and AGRPO's token entropies: written when present (null otherwise), read
    back equal."""
    sample = _traj(0, 0)
    t = sample.trajectory
    t.step_states = torch.tensor([[2, 2, 2, 2], [10, 2, 12, 2]])
    t.step_predictions = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 13]])
    t.step_confidence = torch.tensor([[0.5, 0.25, 0.125, 1.0], [0.0, 0.25, 0.0, 1.0]])
    sample.step_rewards = torch.tensor([0.0, 1.0], dtype=torch.float64)
    t.token_entropy = torch.tensor([0.5, 1.5, 2.0, 0.25])
    store = TrajectoryStore(tmp_path)
    store.add(1, [sample, _traj(0, 1)])
    ds = read_store(tmp_path)
    assert ds["step_states"][0] == t.step_states.tolist() and ds["step_predictions"][0] == t.step_predictions.tolist()
    assert ds["step_confidence"][0] == t.step_confidence.tolist() and ds["step_rewards"][0] == [0.0, 1.0]
    assert ds["token_entropy"][0] == t.token_entropy.tolist()
    assert ds["step_states"][1] is None and ds["step_rewards"][1] is None and ds["token_entropy"][1] is None
