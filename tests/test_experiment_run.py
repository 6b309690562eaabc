"""Smoke test of the experiment command: one seed, a few steps, two models; table and plots appear; resume."""
import json
import subprocess
import sys

from PIL import Image

from train_utils import env


def _run(out):
    cmd = [sys.executable, "-m", "sparo_fast_experiment.run", "--out", str(out), "--models", "sparo,clip",
           "--seeds", "0", "--steps", "2", "--batch-size", "8", "--n-items", "6", "--n-select", "5",
           "--ks", "1,4", "--device", "cpu", "--threads", "1"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_experiment_smoke_writes_table_and_plots_and_resumes(tmp_path):
    out = tmp_path / "exp"
    log = _run(out)
    assert "training 2 steps" in log
    table = (out / "table.md").read_text()
    assert "| metric | sparo | clip |" in table and "clip − sparo" in table
    for row in ("swap-attribute", "held-out pairs: swap-attribute", "robustness: mean", "concept selection"):
        assert row in table, row
    for name in ("categories.png", "splits.png", "concept_selection.png", "slots_sparo.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not (out / "slots_clip.png").exists()  # no slots to show
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"sparo", "clip"} and res["runs"]["sparo"]["0"]["selection"]["ks"] == [1, 4, 16]
    # a second invocation reuses the finished runs and their evaluations
    log = _run(out)
    assert "training" not in log and log.count("reusing") == 2
    assert (out / "table.md").read_text().split("\n", 4)[4] == table.split("\n", 4)[4]
