"""The installed commands (pyproject's [project.scripts]): declared, and, where this interpreter
has mt pip-installed, runnable: Hydra finds conf/ from a console script, and mt-export's folder
goes through mt-translate and mt-evaluate."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO

COMMANDS = {
    "mt-train": "mt.train:main",
    "mt-evaluate": "mt.evaluate:main",
    "mt-translate": "mt.translate:main",
    "mt-export": "mt.export:main",
    "mt-serve": "mt.serve:main",
    "mt-average": "mt.average:main",
}


def test_pyproject_declares_the_commands():
    import importlib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts == COMMANDS
    for target in COMMANDS.values():
        module, func = target.split(":")
        if (REPO / (module.replace(".", "/") + ".py")).is_file():
            assert callable(getattr(importlib.import_module(module), func)), target


def installed(name: str) -> Path:
    """The console script `name` beside this interpreter; skips the test where mt (this version
    of it) is not pip-installed here. The script is looked for, not the package metadata: with
    PYTHONPATH at a checkout, that finds the checkout's mt.egg-info whether installed or not."""
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        pytest.skip(f"{name} is not installed beside {sys.executable}: pip install -e . installs mt's commands")
    return path


def run(*cmd, stdin: bytes = b"", cwd=None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),  # this checkout's mt
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    return subprocess.run(
        [str(c) for c in cmd], input=stdin, capture_output=True, env=env, cwd=cwd or REPO, timeout=300
    )


def test_installed_commands_start(tmp_path):
    """--help of the argparse commands; the Hydra ones compose their config from another
    working directory, which a relative config_path would have failed to find."""
    cmds = {
        "translate": [installed("mt-translate"), "--help"],
        "export": [installed("mt-export"), "--help"],
        "train": [installed("mt-train"), "--cfg", "job", "debug=tiny"],
        "evaluate": [installed("mt-evaluate"), "--cfg", "job", "checkpoint=some/model"],
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = {k: pool.submit(run, *cmd, cwd=tmp_path) for k, cmd in cmds.items()}
        r = {k: f.result() for k, f in done.items()}
    for k, p in r.items():
        assert p.returncode == 0, (k, p.stderr.decode()[-2000:])
    assert b"--checkpoint" in r["translate"].stdout and b"--force" in r["export"].stdout
    assert b"emb_dim: 32" in r["train"].stdout  # conf/debug/tiny.yaml
    assert b"checkpoint: some/model" in r["evaluate"].stdout


def test_export_then_translate_and_evaluate_with_the_installed_commands(tiny_run, tmp_path):
    export, translate, evaluate = installed("mt-export"), installed("mt-translate"), installed("mt-evaluate")
    model = tmp_path / "model"
    r = run(export, tiny_run["checkpoint"], model)
    assert r.returncode == 0, r.stderr.decode()
    assert f"upload with: hf upload USER/NAME {model}" in r.stdout.decode()
    with ThreadPoolExecutor(max_workers=2) as pool:
        t = pool.submit(run, translate, "-c", model, "--device", "cpu", "-q", stdin=b"hund sieht katze\n\nrot blau\n")
        e = pool.submit(
            run,
            evaluate,
            f"checkpoint={model}",
            f"data.path={tiny_run['corpus']}",
            "split=test",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'eval'}",
        )
        t, e = t.result(), e.result()
    assert t.returncode == 0, t.stderr.decode()
    assert t.stdout.decode().splitlines() == ["dog sees cat", "", "red blue"]
    assert e.returncode == 0, e.stderr.decode()
    assert "\nBLEU = " in "\n" + e.stdout.decode() and (tmp_path / "eval" / "scores.test.json").is_file()
