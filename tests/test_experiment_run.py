"""Smoke test of the experiment command: one seed, a few steps, two models; table and plots appear;
resume, and results kept only in the ledger (no run folder) are reused."""
import json
import shutil
import subprocess
import sys

from PIL import Image

from train_utils import env


def _run(out, *extra):
    cmd = [sys.executable, "-m", "sparo_fast_experiment.run", "--out", str(out), "--models", "sparo,clip",
           "--seeds", "0", "--steps", "2", "--batch-size", "8", "--n-items", "6", "--n-select", "5",
           "--n-greedy", "6", "--ks", "1,4", "--device", "cpu", "--threads", "1", *extra]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_experiment_smoke_writes_table_and_plots_and_resumes(tmp_path):
    out = tmp_path / "exp"
    log = _run(out)
    assert "sparo-s0: training 2 steps" in log
    table = (out / "table.md").read_text()
    assert "| metric | sparo | clip |" in table and "clip − sparo" in table and "Holm" in table
    for row in ("swap-attribute", "held-out pairs: swap-attribute", "robustness: mean", "concept selection",
                "greedy concept selection: gain", "Seeds needed (power)", "## CLIP family, budget 1 (2 steps)"):
        assert row in table, row
    for name in ("categories.png", "splits.png", "concept_selection.png", "slots_sparo.png", "slots_by_category.png",
                 "budget_gap.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not (out / "slots_clip.png").exists()  # no slots to show
    ledger = json.loads((out / "results.json").read_text())
    by_model = {e["model"]: e for e in ledger["entries"]}
    assert set(by_model) == {"sparo", "clip"} and by_model["sparo"]["selection"]["ks"] == [1, 4, 16]
    assert "greedy_mean" in by_model["sparo"]["metrics"] and "greedy_mean" not in by_model["clip"]["metrics"]
    # a second invocation reuses the finished runs and their evaluations
    log = _run(out)
    assert "training" not in log and log.count("reusing") == 2
    body = lambda t: t.split("\n", 4)[4]  # noqa: E731  (the header holds this invocation's time)
    assert body((out / "table.md").read_text()) == body(table)
    # without run folders (a committed ledger) nothing is retrained; other settings would retrain
    shutil.rmtree(out / "runs")
    log = _run(out)
    assert "training" not in log and log.count("reusing the ledger's result") == 2


def _entry(model, seed, lr=1e-3):
    return {"family": "clip", "budget": "4", "model": model, "seed": seed, "key": {"lr": lr}, "metrics": {"m": seed}}


def test_ledgers_of_two_folders_merge(tmp_path):
    """Seeds run in parallel into two output folders become one ledger; a run both hold with
    different settings is refused; ``--merge`` of a folder without a ledger is one line."""
    from sparo_fast_experiment.ledger import FORMAT, Ledger

    for name, entries in (("a", [_entry("sparo", 0), _entry("clip", 0)]), ("b", [_entry("sparo", 0), _entry("sparo", 9)]),
                          ("c", [_entry("sparo", 0, lr=1e-4)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"format": FORMAT, "entries": entries}))
    a = Ledger(str(tmp_path / "a" / "results.json"))
    assert a.merge(Ledger(str(tmp_path / "b" / "results.json"))) == 1
    again = Ledger(str(tmp_path / "a" / "results.json"))  # saved
    assert sorted(k[2:] for k in again.entries) == [("clip", 0), ("sparo", 0), ("sparo", 9)]
    try:
        again.merge(Ledger(str(tmp_path / "c" / "results.json")))
    except ValueError as e:
        assert "clip/4/sparo/0 with different settings" in str(e)
    else:
        raise AssertionError("a conflicting run was merged")
    res = subprocess.run([sys.executable, "-m", "sparo_fast_experiment.run", "--out", str(tmp_path / "a"),
                          "--report-only", "--merge", str(tmp_path / "missing")], env=env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and res.stderr.strip().splitlines()[-1].startswith("error: --merge") and \
        "no results.json" in res.stderr, res.stderr
