"""The experiment's statistics: t quantiles, Holm's correction and the power calculation (known answers)."""
import math
import random

import pytest

from sparo_fast_experiment import report
from sparo_fast_experiment import stats as St


def test_t_quantiles_match_published_tables():
    # two-sided 95% (t 0.975) and one-sided 80% quantiles from standard tables
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)):
        assert St.t975(df) == pytest.approx(want, abs=6e-4), df
    assert St.t_ppf(0.8, 9) == pytest.approx(0.883, abs=6e-4)
    assert St.t_ppf(0.995, 5) == pytest.approx(4.032, abs=6e-4)
    for df in (1, 3, 10):
        x = random.uniform(-4, 4)
        assert St.t_cdf(x, df) + St.t_cdf(-x, df) == pytest.approx(1.0, abs=1e-12)
        assert St.t_cdf(St.t_ppf(0.3, df), df) == pytest.approx(0.3, abs=1e-9)
    assert St.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi


def test_paired_p_value_of_stats():
    diffs = [0.04, 0.08, 0.04]  # mean 0.0533, sd 0.0231, t = 4.0 on 2 df: p = 0.0572
    s = St.stats(diffs)
    assert s["p"] == pytest.approx(0.05719, abs=1e-4)
    assert s["half"] == pytest.approx(4.303 * s["std"] / math.sqrt(3), rel=1e-3)


def test_holm_known_answer():
    # sorted p 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert St.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert St.holm([0.2, None, 0.01]) == [pytest.approx(0.2), None, pytest.approx(0.02)]
    assert St.holm([0.6, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]


def test_seeds_for_power_known_answers():
    # paired t-test, two-sided alpha 0.05, power 0.8 (G*Power): effect size 1 -> 10 pairs, 0.5 -> 34 pairs
    assert St.seeds_for_power(sd=0.03, delta=0.03) == 10
    assert St.seeds_for_power(sd=0.06, delta=0.03) == 34
    assert St.seeds_for_power(sd=0.03, delta=0.03, alpha=0.0125) > 10  # a stricter level needs more seeds
    with pytest.raises(ValueError, match="positive"):
        St.seeds_for_power(sd=0.0, delta=0.03)


def test_table_marks_holm_rejections_and_counts_seeds():
    rng = random.Random(7)
    print("seed 7")
    base = {s: {"metrics": {"swap_att": 0.5 + 0.01 * rng.random()}} for s in range(4)}
    big = {s: {"metrics": {"swap_att": base[s]["metrics"]["swap_att"] - 0.2 + 0.001 * s}} for s in range(4)}
    same = {s: {"metrics": {"swap_att": base[s]["metrics"]["swap_att"] + (0.01 if s % 2 else -0.01)}} for s in range(3)}
    text = report.table({"sparo": base, "clip": big, "gap": same})
    assert "sparo: 4 (0, 1, 2, 3); clip: 4 (0, 1, 2, 3); gap: 3 (0, 1, 2)" in text
    row = [ln for ln in text.splitlines() if ln.startswith("| swap-attribute |")][-1]
    cells = row.split("|")[2:4]
    assert cells[0].strip().startswith("**-0.199") and "(n=4)" in cells[0]
    assert not cells[1].strip().startswith("**") and "(n=3)" in cells[1]
    assert "Holm" in text
