"""Pre-flight (launch/preflight.py): every bad input a run reads is caught before Ray starts, as one line on stderr
naming the file or field, exit status 2, and nothing is left behind (no run directory, no temporary). The CLI cases
run `main()` in-process with Ray's start replaced by a tripwire, so a check that lets bad input through fails the
test instead of starting a cluster; one case goes through a real `diffrl` process, and the race of two
`diffrl train` into one directory runs two real processes (slow, Ray)."""
from __future__ import annotations

import http.server
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from launch.cli import main
from launch.preflight import PreflightError, check_checkpoint_dir, check_safetensors, claim_run_dir, scan_data_file

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny-tracerl.yaml")
PATH_MODEL = ["model.tiny=null", "model.tiny_vocab=null"]
FILE_DATA = ["data.task=null", "data.task_kwargs={}"]


# ------------------------------------------------------------------------------------------------- safetensors
def _tensors_file(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.int64)},
              str(path))
    return path


def _library_reads(path: Path) -> bool:
    """The safetensors library's own verdict: open the file and read every tensor."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                fh.get_tensor(key)
    except Exception:  # noqa: BLE001 - any failure of the reference reader is the verdict "unreadable"
        return False
    return True


def _damaged(whole: bytes) -> dict[str, bytes]:
    (header_len,) = struct.unpack("<Q", whole[:8])
    return {
        "truncated": whole[:-1],
        "trailing bytes": whole + b"\0" * 8,
        "header cut": whole[: 8 + header_len // 2],
        "length field only": whole[:4],
        "header not JSON": whole[:8] + b"\xff" * header_len + whole[8 + header_len:],
        "huge header length": struct.pack("<Q", 2**40) + whole[8:],
    }


def test_whole_safetensors_passes_and_agrees_with_the_library(tmp_path):
    path = _tensors_file(tmp_path)
    check_safetensors(path)
    assert _library_reads(path)


DAMAGES = ("truncated", "trailing bytes", "header cut", "length field only", "header not JSON", "huge header length")


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_safetensors_is_named(tmp_path, damage):
    whole = _tensors_file(tmp_path).read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(_damaged(whole)[damage])
    with pytest.raises(PreflightError) as info:
        check_safetensors(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    if damage != "trailing bytes":  # the library tolerates trailing bytes; we refuse them (a mismatched file)
        assert not _library_reads(path), "our check refuses a file the reference reader accepts"


def test_truncated_safetensors_message_gives_both_sizes(tmp_path):
    whole = _tensors_file(tmp_path).read_bytes()
    (header_len,) = struct.unpack("<Q", whole[:8])
    data = len(whole) - 8 - header_len
    path = tmp_path / "model.safetensors"
    path.write_bytes(whole[:-10])
    with pytest.raises(PreflightError, match=f"truncated: the header's offsets need {data} bytes of tensor "
                                             f"data, the file holds {data - 10}"):
        check_safetensors(path)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_index_names_a_missing_shard(tmp_path, tiny_model_dirs):
    model = _copy_model(tiny_model_dirs["block"], tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(PreflightError, match="model.path: .*index.json: names model-00002-of-00002.safetensors"):
        check_checkpoint_dir(model)


# -------------------------------------------------------------------------------------------------------- data
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("\n\n  \n", "no rows"),
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n{not json\n{"prompt": "c", "answer": "3"}\n'
     '{"prompt": "d"}\n', "2 of 5 rows unusable; first at line 3: not valid JSON"),
    ('\n{"prompt": "a", "answer": "1"}\n[1, 2]\n', "1 of 2 rows unusable; first at line 3: not a JSON object"),
    ('{"question": "a", "answer": "1"}\n', "no column 'prompt' (data.prompt_field; columns: answer, question)"),
])
def test_jsonl_scan(tmp_path, text, message):
    path = _write(tmp_path / "d.jsonl", text)
    with pytest.raises(PreflightError) as info:
        scan_data_file(path, "prompt", "answer")
    assert str(info.value).startswith(f"data.train: {path}: ") and message in str(info.value)


def test_good_files_pass_with_their_row_count(tmp_path):
    rows = [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": "2", "extra": [1]}]
    jsonl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert scan_data_file(jsonl, "prompt", "answer") == 2
    assert scan_data_file(_write(tmp_path / "d.json", json.dumps(rows)), "prompt", "answer") == 2
    with pytest.raises(PreflightError, match=r"1 of 2 rows unusable; first at row 1: no answer"):
        scan_data_file(_write(tmp_path / "e.json", json.dumps([rows[0], {"prompt": "x"}])), "prompt", "answer")


def test_parquet_scan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["1+1="], "a": ["2"]}), tmp_path / "d.parquet")
    assert scan_data_file(tmp_path / "d.parquet", "q", "a") == 1
    with pytest.raises(PreflightError, match="no column 'prompt' .data.prompt_field; columns: a, q"):
        scan_data_file(tmp_path / "d.parquet", "prompt", "a")
    pq.write_table(pa.table({"q": pa.array([], pa.string()), "a": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(PreflightError, match="e.parquet: no rows"):
        scan_data_file(tmp_path / "e.parquet", "q", "a")
    _write(tmp_path / "f.parquet", "not parquet")
    with pytest.raises(PreflightError, match="f.parquet: unreadable Parquet"):
        scan_data_file(tmp_path / "f.parquet", "q", "a")


# -------------------------------------------------------------------------------------------- run dir claim
def test_claim_is_exclusive_and_released(tmp_path):
    run = tmp_path / "runs" / "r"
    first = claim_run_dir(run)
    assert first.made_dir and (run / ".lock").read_text() == f"{__import__('os').getpid()}\n"
    with pytest.raises(PreflightError, match=f"output_dir: {run}: in use by another diffrl run"):
        claim_run_dir(run)  # flock is per open file: a second claim in this process is refused too
    first.release()
    second = claim_run_dir(run)
    assert not second.made_dir
    second.abandon()  # not made by it, the lock file not fresh: nothing removed
    assert (run / ".lock").is_file()
    third = claim_run_dir(run)
    third.release()
    fresh = tmp_path / "fresh"
    claim = claim_run_dir(fresh)
    claim.abandon()
    assert not fresh.exists()


def test_a_claim_in_another_process_is_refused(tmp_path):
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from launch.preflight import claim_run_dir; "
                               f"c = claim_run_dir({str(run)!r}); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PreflightError, match="in use by another diffrl run"):
            claim_run_dir(run)
    finally:
        holder.kill()
        holder.wait()
    claim_run_dir(run).release()  # SIGKILL released it: no stale claim


# -------------------------------------------------------------------------------------------- the CLI, in-process
@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray is a test failure: every case here must be refused before."""
    import launch.driver

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started: the bad input was not caught in pre-flight")

    monkeypatch.setattr(launch.driver, "ray_session", tripwire)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(capsys, tmp_path, argv: list[str], *needles: str, before: list[str] | None = None) -> str:
    """Run `diffrl ARGV`: exit 2, at most 3 stderr lines, the last naming every needle, tmp_path as it was."""
    before = _listing(tmp_path) if before is None else before
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 1 <= len(err) <= 3, err
    line = err[-1]
    assert line.startswith("diffrl: error: ") and "\x1b" not in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    assert _listing(tmp_path) == before, "something was left behind"
    return line


def _train(tmp_path, *overrides: str) -> list[str]:
    return ["train", RECIPE, f"output_dir={tmp_path / 'run'}", "-q", *overrides]


def test_truncated_weights_are_named_before_ray(tmp_path, capsys, tiny_model_dirs, no_ray):
    model = _copy_model(tiny_model_dirs["block"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(capsys, tmp_path, _train(tmp_path, *PATH_MODEL, f"model.path={model}"),
             f"model.path: {weights}: truncated")


def test_unparseable_config_is_named(tmp_path, capsys, tiny_model_dirs, no_ray):
    model = _copy_model(tiny_model_dirs["block"], tmp_path / "model")
    (model / "config.json").write_text('{"model_type": "qwen3",')
    _refused(capsys, tmp_path, _train(tmp_path, *PATH_MODEL, f"model.path={model}"),
             f"model.path: {model / 'config.json'}: unreadable JSON")


def test_tokenizer_without_mask_token_is_named(tmp_path, capsys, tiny_model_dirs, no_ray):
    from rollout.models.tiny import small_tokenizer

    model = _copy_model(tiny_model_dirs["block"], tmp_path / "model")
    for name in ("diffrl.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    tokenizer = small_tokenizer("<|not_a_mask|>")
    tokenizer.mask_token = None
    tokenizer.save_pretrained(str(model))
    _refused(capsys, tmp_path, _train(tmp_path, *PATH_MODEL, f"model.path={model}"),
             f"model.path: {model}: tokenizer has no mask token")


@pytest.mark.parametrize("text, needle", [
    ("", "empty file (no rows)"),
    ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n{"prompt": "3+3="}\n',
     "2 of 3 rows unusable; first at line 2: not valid JSON"),
    ('{"question": "1+1=", "answer": "2"}\n', "no column 'prompt' (data.prompt_field"),
])
def test_bad_data_files_are_named(tmp_path, capsys, text, needle, no_ray):
    data = _write(tmp_path / "train.jsonl", text)
    _refused(capsys, tmp_path, _train(tmp_path, *FILE_DATA, f"data.train={data}"), f"data.train: {data}: {needle}")


def test_a_failure_after_the_claim_removes_the_run_directory(tmp_path, capsys, no_ray):
    # the reward is resolved after the run directory is claimed and the tiny model built: both must go again
    _refused(capsys, tmp_path, _train(tmp_path, "reward.0.fn=launch.data:no_such_fn"), "reward[0].fn")
    existing = tmp_path / "run"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    _refused(capsys, tmp_path, _train(tmp_path, "reward.0.fn=launch.data:no_such_fn"), "reward[0].fn")


def test_a_run_directory_in_use_is_refused(tmp_path, capsys, no_ray):
    claim = claim_run_dir(tmp_path / "run")
    try:
        _refused(capsys, tmp_path, _train(tmp_path), f"output_dir: {tmp_path / 'run'}: in use by another diffrl run")
    finally:
        claim.release()


# ----------------------------------------------------------------------------------------------------- submit
class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """A dashboard that answers every request 401, as a token-auth Ray head does without a token."""

    def _deny(self):
        body = b"Unauthorized: missing or invalid authentication token"
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _deny

    def log_message(self, *args):  # keep the test's stderr for diffrl's own lines
        pass


@pytest.fixture
def unauthorized_address():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_submit_without_a_token_is_one_line(tmp_path, capsys, unauthorized_address, monkeypatch):
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token
    _refused(capsys, tmp_path, ["submit", RECIPE, "--address", unauthorized_address],
             f"--address {unauthorized_address}: Authentication required", "RAY_AUTH_TOKEN")


def test_submit_to_an_unreachable_address_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _refused(capsys, tmp_path, ["submit", RECIPE, "--address", f"http://127.0.0.1:{port}"],
             f"--address http://127.0.0.1:{port}: cannot reach the Ray dashboard")


def test_submit_checks_the_data_before_uploading(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", "")
    _refused(capsys, tmp_path, ["submit", RECIPE, *FILE_DATA, f"data.train={data}", "--address", "http://unused:1"],
             f"data.train: {data}: empty file")


# ----------------------------------------------------------------------------------------------------- status
def test_status_shows_a_failed_runs_cause_in_one_plain_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    coloured = ("RayTaskError(ModelLoadError): \x1b[36mray::Learner.__init__()\x1b[39m (pid=1, ip=127.0.0.1)\n"
                "  File \"x.py\", line 3\n    raise\nModelLoadError: /m/model.safetensors: weights failed to load")
    (run / "run.json").write_text(json.dumps({"status": "failed", "total_steps": 2, "error": coloured}))
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    errors = [line for line in out if line.startswith("  error: ")]
    assert errors == ["  error: RayTaskError(ModelLoadError): ray::Learner.__init__() (pid=1, ip=127.0.0.1) "
                      "File \"x.py\", line 3 raise ModelLoadError: /m/model.safetensors: weights failed to load"]


def test_failure_line_is_the_actors_cause():
    from launch.driver import failure_line
    from rollout.models.spec import ModelLoadError

    class FakeTaskError(Exception):  # Ray's RayTaskError: a coloured traceback as text, the real error as .cause
        def __init__(self, cause):
            super().__init__("\x1b[36mray::Learner\x1b[39m\nTraceback ...\n  85 lines")
            self.cause = cause

    cause = ModelLoadError("/m/model.safetensors: weights failed to load")
    assert failure_line(FakeTaskError(cause)) == "ModelLoadError: /m/model.safetensors: weights failed to load"
    assert failure_line(RuntimeError("a\n\x1b[31mb\x1b[0m")) == "RuntimeError: a b"


# ------------------------------------------------------------------------------------------- real processes
def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    from tests.launch.cli_runner import run_cli

    return run_cli(*args, cwd=cwd, timeout=timeout)


def test_real_process_truncated_checkpoint(tmp_path, tiny_model_dirs):
    model = _copy_model(tiny_model_dirs["block"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _listing(tmp_path)
    start = time.monotonic()
    done = _cli("train", RECIPE, f"output_dir={tmp_path / 'run'}", *PATH_MODEL, f"model.path={model}", cwd=tmp_path,
                timeout=120)
    elapsed = time.monotonic() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert 1 <= len(lines) <= 3 and lines[-1].startswith(f"diffrl: error: model.path: {weights}: truncated"), lines
    assert _listing(tmp_path) == before
    assert elapsed < 60, f"{elapsed:.0f}s: pre-flight should fail in seconds, not after Ray's start-up"


@pytest.mark.slow
@pytest.mark.ray
def test_two_trains_into_one_directory_exactly_one_runs(tmp_path):
    """Two `diffrl train` into one output_dir 2 s apart: one finishes, the other is refused in one line (exit 2)
    and leaves no temporary behind."""
    from tests.launch.cli_runner import CLI, cli_env, kill_group

    run = tmp_path / "run"
    argv = [sys.executable, *CLI, "train", RECIPE, f"output_dir={run}", "-q", "trainer.total_steps=1"]
    procs = []
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(argv, cwd=tmp_path, env=cli_env(), text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True))
            time.sleep(2)
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            kill_group(p.pid)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, err[-1500:]) for p, (_, err) in zip(procs, outs)]
    loser = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2).strip().splitlines()
    assert 1 <= len(loser) <= 3 and loser[-1].startswith(f"diffrl: error: output_dir: {run}"), loser
    assert not list(run.rglob(".*.tmp")), "a temporary was left behind"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
