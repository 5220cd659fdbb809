"""Install metadata stays consistent: environment.yml pins exactly what requirements.txt pins."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _reqs(path):
    return sorted(line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == _reqs(ROOT / "requirements.txt")


def test_torch_is_pinned_with_everything_else():
    assert "torch==2.13.0" in _reqs(ROOT / "requirements.txt")
    assert all("==" in r for r in _reqs(ROOT / "requirements.txt"))
    assert all("==" in r for r in _reqs(ROOT / "requirements-assets.txt"))
