"""The GPU report command stops with one clear line where there is no NVIDIA GPU."""
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_report_needs_a_gpu(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "sparo_fast_kernels.testing.gpu_report", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "needs an NVIDIA GPU" in lines[0], lines
    assert not out.exists()


def test_junit_parsing(tmp_path):
    from sparo_fast_kernels.testing.gpu_report import junit_cases

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a" time="0.5"/>'
                   '<testcase classname="t" name="b" time="1"><failure message="boom"/></testcase>'
                   '<testcase classname="t" name="c"><skipped message="no gpu"/></testcase></testsuite></testsuites>')
    assert [(c["test"], c["outcome"]) for c in junit_cases(str(xml))] == [("t::a", "passed"), ("t::b", "failed"),
                                                                          ("t::c", "skipped")]
