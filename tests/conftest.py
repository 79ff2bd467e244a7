"""Test-suite wide settings (never touch the network, keep torch on the 2 CI cores) and the
fixtures several test files share."""

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("NOS_OFFLINE", "1")
# generated CPU kernels compile into this run's own directory, not the user's ~/.cache/nos_sym
if "NOS_SYM_CACHE" not in os.environ:
    os.environ["NOS_SYM_CACHE"] = tempfile.mkdtemp(prefix="nos_sym_kernels_")
    atexit.register(shutil.rmtree, os.environ["NOS_SYM_CACHE"], True)


# (step, DSL, outcome, status, reward): three controller steps of a small run, with a rule met
# again (from_store), a degenerate one and a diverged one
_RUN_SAMPLES = (
    (1, "m v id sqrt div", "evaluated", "ok", 0.82),
    (1, "sign_g sign_m id id mul ; o1 g exp id mul", "evaluated", "ok", 0.79),
    (1, "one one id id add", "degenerate", "degenerate", 0.0),
    (2, "g g id id keep", "evaluated", "ok", 0.61),
    (2, "m v id sqrt div", "from_store", "ok", 0.82),
    (2, "g noise id id add", "evaluated", "diverged", 0.1),
    (3, "sign_g sign_m id id mul ; o1 one id id add ; o2 g id id mul", "evaluated", "ok", 0.8),
    (3, "g v id sqrt div", "evaluated", "ok", 0.7),
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A search run directory written directly (config, sample log, checkpoint), no training;
    its name has characters that HTML must escape."""
    import torch

    from nos_sym.controller.search import SearchConfig
    from nos_sym.dsl import parse

    root = tmp_path / "run <b>&amp;"
    root.mkdir()
    config = SearchConfig(space="small", dataset="synthetic", backend="inline", budget=6, batch=3)
    (root / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "run_id": "t1"}))
    lines = [
        {
            "step": step,
            "index": index,
            "dsl": parse(dsl).dsl,
            "key": parse(dsl).key,
            "outcome": outcome,
            "status": status,
            "reward": reward,
        }
        for index, (step, dsl, outcome, status, reward) in enumerate(_RUN_SAMPLES)
    ]
    (root / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    torch.save({"step": 3, "algorithm": {}}, root / "checkpoint.pt")
    return root
