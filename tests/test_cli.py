"""The sol CLI: bench runs end to end; user errors give one line and exit 2, with no partial output."""
import subprocess
import sys

import pandas as pd


def _sol(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sol.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.csv"
    r = _sol("bench", "--model", "tiny-llama", "--kv-len", "64", "--steps", "3", "--warmup", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert len(df) == 9 and df.loc[df.action == "k100-s100-q16", "time_ratio"].item() == 1.0
    assert ((df.fvcore_macs - df.analytic_macs).abs() <= 0.01 * df.analytic_macs).all()
    dense = df.action == "k100-s100-q16"
    assert df.loc[dense, "bytes_keep"].item() == 1.0
    assert (df.loc[df.token_keep == 1.0, "bytes_keep"] <= 1.0).all()  # QUEST's metadata may cost more at 64 keys
    assert (df.roofline_ratio == df.time_ratio / df.bytes_keep).all()
    assert "flop_keep" in r.stdout


def test_errors_are_one_line(tmp_path):
    out = tmp_path / "x.csv"
    for args, needle in [(["bench", "--model", "nope"], "unknown model 'nope'"),
                         (["bench", "--model", "tiny-llama", "--actions", "0.5,0.5"], "bad action"),
                         (["bench", "--model", "tiny-llama", "--actions", "0.5,1.5,8"], "out of range")]:
        r = _sol(*args, "--out", str(out))
        assert r.returncode == 2, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], r.stderr
        assert not out.exists()


def test_numeric_arguments_are_validated(tmp_path):
    """Every numeric option is range-checked by the parser: exactly one line (``error: ...``), exit 2, no output."""
    out = tmp_path / "x.csv"
    cases = [(["eval", "ppl", "--steps", "0"], "--steps: 0 is out of range"),
             (["eval", "mmlu", "--per-subject", "-3"], "--per-subject: -3 is out of range"),
             (["bench", "--kv-len", "-5"], "--kv-len: -5 is out of range"),
             (["eval", "ppl", "--budget", "0"], "--budget: 0 is out of range"),
             (["eval", "ppl", "--memory-gb", "-1"], "--memory-gb"),
             (["eval", "ppl", "--blocks", "many"], "'many' is not an integer"),
             (["study", "headroom", "--low", "1", "--high", "2", "--mid", "1", "--hi-share", "1.5", "--out",
               str(tmp_path)], "--hi-share: 1.5 is out of range")]
    for args, needle in cases:
        r = _sol(*args, *(["--out", str(out)] if "--out" not in args else []))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert needle in r.stderr, r.stderr
        assert r.stdout == "" and not out.exists()


def test_eval_merge(tmp_path):
    """Parts of separate jobs merge into one summary and one per-block file; a (method, budget) twice, a missing
    per-block file and --match-summary without --paper-baselines are one-line errors with no output."""
    def part(name, methods):
        rows = [{"method": m, "budget": 0.7, "token_keep": 1, "prune_keep": 1, "bit_ratio": 1, "total_keep": 1,
                 "ppl": 2.0} for m in methods]
        pd.DataFrame(rows).to_csv(tmp_path / f"{name}.csv", index=False)
        pd.DataFrame([{"method": m, "budget": 0.7, "block": 0, "nll": 0.7} for m in methods]).to_csv(
            tmp_path / f"{name}.blocks.csv", index=False)
        return str(tmp_path / f"{name}.csv")

    a, b = part("a", ["policy", "dense"]), part("b", ["matched", "emc"])
    out = tmp_path / "ppl.csv"
    r = _sol("eval", "merge", a, b, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(out).method.tolist() == ["policy", "dense", "matched", "emc"]
    assert len(pd.read_csv(tmp_path / "ppl.blocks.csv")) == 4
    bad = tmp_path / "bad.csv"
    for args, needle in [([a, part("c", ["emc"]), b], "method 'emc' at budget 0.7 appears in two parts"),
                         ([a, str(tmp_path / "none.csv")], "cannot read summary")]:
        r = _sol("eval", "merge", *args, "--out", str(bad))
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
        assert not bad.exists()
    r = _sol("eval", "ppl", "--model", "tiny-llama", "--match-summary", a, "--out", str(bad))
    assert r.returncode == 2 and "only makes sense with --paper-baselines" in r.stderr and not bad.exists()
