"""Start-up: ``nos-sym parse``, ``tree``, ``top`` and ``status`` import neither torch nor
matplotlib, and the controller step that ``status`` reads from ``checkpoint.json`` is the
checkpoint's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_search import InstantBackend, config

from nos_sym.choices import ALGORITHMS, BACKENDS, DATASETS, SPACES
from nos_sym.controller.rundir import checkpoint_step, load_checkpoint, status
from nos_sym.controller.search import SearchRun
from nos_sym.errors import SearchError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of 2 steps, paid for instantly."""
    run_dir = tmp_path_factory.mktemp("startup") / "run"
    SearchRun(run_dir, config(algo="random", budget=8, batch=4)).run(backend=InstantBackend())
    return run_dir


HEAVY = ("torch", "matplotlib", "nos_sym.evaluation.evaluator")


@pytest.mark.parametrize("name", ["parse", "tree", "top", "status"])
def test_light_commands_start_without_torch(finished_run, tmp_path, name):
    """A command imports only its own module: none of these loads torch, matplotlib or the
    evaluator, in any output format."""
    run, rule = str(finished_run), "m v id sqrt div"
    commands = {
        "parse": [["parse", rule, "--format", fmt] for fmt in ("text", "latex", "json", "dsl")],
        "tree": [["tree", rule, "-o", str(tmp_path / "t.dot")]],
        "top": [["top", run, "--format", fmt] for fmt in ("text", "json", "latex", "markdown")],
        "status": [["status", run, "--format", fmt] for fmt in ("text", "json")],
    }[name]
    script = (
        "import sys; from nos_sym.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    assert main(argv) == 0, argv\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _copy_run(source: Path, target: Path, without: str | None = None) -> Path:
    """A copy of run directory ``source`` at ``target``, file ``without`` left out."""
    target.mkdir()
    for path in source.iterdir():
        if path.name != without:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_status_reads_an_old_run_dirs_step_without_torch(finished_run, tmp_path):
    """A run directory from before ``checkpoint.json``: the step comes from the checkpoint's
    pickle, read without torch (no class of the file is imported)."""
    run_dir = _copy_run(finished_run, tmp_path / "old", without="checkpoint.json")
    step = load_checkpoint(finished_run)["step"]
    script = (
        "import sys; from nos_sym.controller.rundir import checkpoint_step\n"
        f"assert checkpoint_step({str(run_dir)!r}) == {step}\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 not a zip", b"\x80\x09 a pickle of an unknown protocol"],
    ids=["empty", "broken-zip", "bad-pickle"],
)
def test_a_damaged_checkpoint_without_sidecar_is_still_one_line(finished_run, tmp_path, content):
    run_dir = _copy_run(finished_run, tmp_path / "damaged", without="checkpoint.json")
    (run_dir / "checkpoint.pt").write_bytes(content)
    with pytest.raises(SearchError, match="cannot be read as a search checkpoint"):
        checkpoint_step(run_dir)


class _Planted:
    """Unpickles as a call of ``os.system`` (what a hostile checkpoint could hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_the_step_reader_runs_no_code_of_the_file(tmp_path):
    import pickle
    import zipfile

    from nos_sym.controller.rundir import _pickled_step

    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"step": 3, "x": _Planted(marker)}))
    assert _pickled_step(path) == 3
    assert not marker.exists()


def _stale(run_dir: Path) -> None:
    """The checkpoint rewritten after its step was recorded (e.g. copied or replaced)."""
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes() + b"")  # a new mtime, the same content
    record = json.loads((run_dir / "checkpoint.json").read_text())
    (run_dir / "checkpoint.json").write_text(json.dumps({**record, "step": 99, "mtime_ns": 0}))


@pytest.mark.parametrize(
    "change",
    [
        lambda run_dir: None,  # as written by the run loop
        lambda run_dir: (run_dir / "checkpoint.json").unlink(),  # a run dir from before
        lambda run_dir: (run_dir / "checkpoint.json").write_text("{not json"),
        _stale,
    ],
    ids=["sidecar", "no-sidecar", "damaged-sidecar", "stale-sidecar"],
)
def test_checkpoint_step_is_the_checkpoints(finished_run, tmp_path, change):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    if change is not _stale and (finished_run / "checkpoint.json").exists():
        # the copy gave checkpoint.pt a new mtime: record it as the run loop would have
        stat = (run_dir / "checkpoint.pt").stat()
        record = json.loads((run_dir / "checkpoint.json").read_text())
        record |= {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (run_dir / "checkpoint.json").write_text(json.dumps(record))
    change(run_dir)
    step = load_checkpoint(finished_run)["step"]
    assert checkpoint_step(run_dir) == step > 0
    assert status(run_dir)["controller_steps"] == step


def test_the_light_names_are_the_implementations():
    from nos_sym.controller.algorithms import ALGORITHMS as ALGORITHM_CLASSES
    from nos_sym.controller.backends import BACKENDS as BACKEND_NAMES
    from nos_sym.controller.space import SPACES as SPACE_PRESETS
    from nos_sym.evaluation.datasets import DATASETS as DATASET_NAMES

    assert tuple(ALGORITHM_CLASSES) == ALGORITHMS
    assert tuple(SPACE_PRESETS) == SPACES
    assert BACKEND_NAMES == BACKENDS and DATASET_NAMES == DATASETS
