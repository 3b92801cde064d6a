"""benchmarks/recipe_timing.py: time to best validation BLEU from a train.log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG = """\
[2026-11-27 10:00:00,000][mt.train][INFO] - tokenizer: trained joint model /tmp/x.model
[2026-11-27 10:00:04,500][mt.train][INFO] - model: 5,615,936 parameters, cell=triton (triton), device=cuda
[2026-11-27 10:00:07,000][mt.train][INFO] - precompile: 12 of 12 Triton kernel variants precompiled by 8 processes in 1.9 s (13.0 s of compiling; waited 1.7 s); 2.5 s in all, the dry run included
[2026-11-27 10:00:20,500][mt.train][INFO] - step 250 | valid loss 3.572 ppl 35.58 | BLEU 8.70 | best 8.70 * | 0.6s
[2026-11-27 10:00:21,100][mt.train][INFO] - step 250 | valid chrF 24.81 BLEU(lc) 8.80 | reported in the background in 0.6s
[2026-11-27 10:00:31,000][mt.train][INFO] - step 500 | valid loss 2.142 ppl 8.52 | BLEU 31.17 | best 31.17 * | 0.5s
[2026-11-27 10:00:31,400][mt.train][INFO] - step 500 | valid chrF 50.96 BLEU(lc) 31.37 | reported in the background in 0.4s
[2026-11-27 10:00:40,250][mt.train][INFO] - step 750 | valid loss 2.300 ppl 9.97 | BLEU 30.02 | best 31.17 | 0.5s
[2026-11-27 10:00:40,900][mt.train][INFO] - triton: first launches of 12 Triton kernel variants took 0.4 s on the launching thread (loading or compiling); 0 of them were not precompiled (0.0 s)
[2026-11-27 10:00:41,000][mt.train][INFO] - done: step 750, best validation BLEU 31.17
"""


def run(tmp_path, text, *extra):
    log = tmp_path / "train.log"
    log.write_text(text)
    out = tmp_path / "timing.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recipe_timing.py"), str(log), "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, out


def test_best_bleu_and_its_times(tmp_path):
    started = __import__("datetime").datetime(2026, 11, 27, 9, 59, 58).timestamp()  # 2 s before the first line
    proc, out = run(tmp_path, LOG, "--started", str(started))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    best = res["best"]
    assert best["step"] == 500 and best["bleu"] == 31.17
    assert abs(best["since_training"] - 26.5) < 1e-6  # from the "model:" line
    assert abs(best["since_start"] - 33.0) < 1e-6  # from --started
    assert abs(res["preparation_s"] - 6.5) < 1e-6
    assert [v["step"] for v in res["validations"]] == [250, 500, 750]
    assert [v["bleu_lc"] for v in res["validations"]] == [8.80, 31.37, None]  # 750's report not logged yet
    assert best["chrf"] == 50.96
    assert "best BLEU 31.17 at step 500" in proc.stdout
    assert res["precompile"]["text"].startswith("12 of 12 Triton kernel variants precompiled by 8 processes")
    assert abs(res["precompile"]["since_training"] - 2.5) < 1e-6
    assert "0 of them were not precompiled" in res["triton"]["text"] and "triton: first launches" in proc.stdout


def test_logs_with_all_scores_on_the_validation_line(tmp_path):
    """Logs written before the report moved to the background."""
    old = LOG.replace("| BLEU 31.17 | best", "| BLEU 31.17 chrF 50.96 BLEU(lc) 31.37 | best")
    old = "\n".join(line for line in old.splitlines() if "valid chrF" not in line) + "\n"
    proc, out = run(tmp_path, old)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["best"]["step"] == 500 and res["best"]["bleu_lc"] == 31.37 and res["best"]["chrf"] == 50.96
    assert [v["chrf"] for v in res["validations"]] == [None, 50.96, None]
    old = "\n".join(line for line in old.splitlines() if "precompile" not in line and "triton:" not in line) + "\n"
    proc, out = run(tmp_path, old)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["precompile"] is None and res["triton"] is None and res["best"]["step"] == 500


def test_a_log_where_training_never_started_is_an_error(tmp_path):
    proc, out = run(tmp_path, LOG.splitlines()[0] + "\n")
    assert proc.returncode != 0 and "training never started" in proc.stderr
    assert not out.exists()
