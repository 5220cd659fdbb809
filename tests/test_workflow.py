"""The pipeline's contracts: every config validates against workflow/schemas/config.schema.yaml and builds its DAG,
config mistakes fail before any rule runs, `snakemake --lint` finds nothing but the conda directive we leave out
(rules run in the environment `make setup` builds; environment.yml cannot install the asset wheels with --no-deps),
and a fresh clone plans nothing for the committed results (workflow/rules/checkout.smk)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "workflow" / "configs").glob("*.yaml"))


def _snakemake(*args):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_validates_and_builds_its_dag(config):
    r = _snakemake("-n", "--forceall", "all", "--configfile", str(config))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rule train" in r.stdout + r.stderr  # the whole DAG, training included


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["eval"].update(blockz=3), "blockz"),                    # a typo: unknown key
    (lambda c: c["eval"].update(blocks="many"), "many"),                 # a wrong type
    (lambda c: c["eval"].update(budgets=[0.7, 1.5]), "1.5"),             # out of range
    (lambda c: c["mmlu"].update(style="letters"), "letters"),            # not one of the choices
    (lambda c: c["train"].update(model="tiny-qwen2"), "train.model"),    # trains another model than it evaluates
])
def test_config_mistakes_fail_before_any_rule(tmp_path, edit, needle):
    cfg = yaml.safe_load((ROOT / "workflow" / "configs" / "ci.yaml").read_text())
    edit(cfg)
    cfg["out"] = str(tmp_path / "out")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _snakemake("-n", "all", "--configfile", str(path))
    assert r.returncode != 0 and needle in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert not (tmp_path / "out").exists()


def test_lint_finds_nothing_but_the_conda_directive():
    r = _snakemake("--lint", "--configfile", str(ROOT / "workflow" / "configs" / "ci.yaml"))
    lints = {line.strip() for line in (r.stdout + r.stderr).splitlines() if line.startswith("    * ")}
    assert lints <= {"* Specify a conda environment or container for each rule.:"}, lints


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """A fresh clone of this checkout's HEAD, as a new user gets it (every file written at checkout time)."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    dst = tmp_path_factory.mktemp("clone") / "sol"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True)
    return dst


def _dry(cwd, *args):
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("args", [("all",), ("results/pareto_mmlu.pdf",),
                                  ("all", "--configfile", "workflow/configs/qwen0.5b.yaml")])
def test_fresh_clone_has_nothing_to_do_for_the_committed_results(fresh_clone, args):
    out = _dry(fresh_clone, *args)
    assert "Nothing to be done" in out, out[-2000:]


def test_fresh_clone_still_sees_a_stale_input(fresh_clone):
    """Settling the checkout's times hides nothing: an input newer than its outputs still plans the reruns."""
    _dry(fresh_clone, "all")  # settles once per clone
    policy = fresh_clone / "results" / "policy" / "policy.pt"
    policy.touch()
    try:
        out = _dry(fresh_clone, "all")
        assert "Updated input files: results/policy/policy.pt" in out and "rule eval_policy" in out, out[-2000:]
    finally:
        stamp = int(subprocess.run(["git", "-C", str(fresh_clone), "log", "-1", "--format=%ct", "--",
                                    "results/policy/policy.pt"], capture_output=True, text=True).stdout)
        os.utime(policy, (stamp, stamp))
