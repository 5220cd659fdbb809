"""Report and claims check on synthetic results: verdicts follow the data, tampering is caught."""
import json

import numpy as np
import pandas as pd
import pytest

from sol.report import build_report, caveats, check, claims_markdown, compute_claims, sanity


def _rows(method, budget, nll, keep):
    """A summary row and its per-block rows, written as `sol eval ppl` writes them (consistent by construction)."""
    from sol.evaluate import block_rows, summary_row

    n = len(nll)
    r = {"nll": np.asarray(nll, dtype=np.float32)[:, None], "flop_keep": np.full(n, keep),
         "total_keep": np.full(n, keep + 0.01), "token_keep": np.ones(n), "prune_keep": np.full(n, keep),
         "bit_ratio": np.ones(n)}
    return summary_row(method, budget, r, "tiny-llama"), block_rows(method, budget, r)


def _results(tmp_path, policy_better=True, adherence=0.01, n_random=5):
    rng = np.random.default_rng(0)
    budgets = [0.6, 0.8]
    rows, blocks = [], []
    for b in budgets:
        base = 3.0 - b  # cheaper → worse
        trials = [(f"random:seed={i}", 0.02 + 0.01 * i) for i in range(n_random)]
        for method, shift in (("policy", -0.05 if policy_better else 0.05), ("matched", 0.0), ("random-best", 0.02),
                              *trials, ("emc", 0.01), ("dac", 0.01)):
            nll = base + shift + rng.normal(0, 0.01, 20)
            keep = b + (adherence if method == "policy" else 0.0)
            row, per = _rows(method, b, nll, keep)
            rows.append(row)
            blocks += per
    pd.DataFrame(rows).to_csv(tmp_path / "ppl.csv", index=False)
    pd.DataFrame(blocks).to_csv(tmp_path / "ppl.blocks.csv", index=False)
    return tmp_path


def test_verdicts_follow_the_data(tmp_path):
    good = {c["id"]: c["verdict"] for c in compute_claims(_results(tmp_path))}
    assert good["front_beats_fixed"] == "reproduced" and good["budget_adherence"] == "reproduced"
    assert good["beats_best_random"] == "reproduced" and good["monotone_knob"] == "reproduced"
    assert good["mmlu_gain_over_uniform"] == "not testable at this scale"
    bad = {c["id"]: c["verdict"] for c in compute_claims(_results(tmp_path, policy_better=False, adherence=0.08))}
    assert bad["front_beats_fixed"] == "not reproduced" and bad["budget_adherence"] == "not reproduced"


def test_claim_rules_a_referee_would_sign(tmp_path):
    """Claim 4 needs ≥ 5 random trials and is a non-inferiority test; claim 5 fails only on a significant increase
    and needs two reachable budgets."""
    c = {c["id"]: c for c in compute_claims(_results(tmp_path, n_random=2))}
    assert c["beats_best_random"]["verdict"] == "not testable at this scale" and "at least 5" in c["beats_best_random"]["ours"]
    c = {c["id"]: c for c in compute_claims(_results(tmp_path, policy_better=False))}
    assert c["beats_best_random"]["verdict"] == "not reproduced"  # 0.03 nats worse: beyond the 0.01 margin
    res = _results(tmp_path)
    b = pd.read_csv(res / "ppl.blocks.csv")
    b.loc[(b.method == "policy") & (b.budget == 0.8), "nll"] += 3.0  # perplexity rises with the budget
    b.to_csv(res / "ppl.blocks.csv", index=False)
    c = {c["id"]: c for c in compute_claims(res)}
    assert c["monotone_knob"]["verdict"] == "not reproduced" and "0.6→0.8" in c["monotone_knob"]["ours"]
    ppl = pd.read_csv(res / "ppl.csv")
    ppl["keep_floor"] = 0.65  # only budget 0.8 is reachable
    ppl.to_csv(res / "ppl.csv", index=False)
    assert {c["id"]: c for c in compute_claims(res)}["monotone_knob"]["verdict"] == "not testable at this scale"


def _mmlu(res, gain: float, dense_acc: float, n: int = 400, seed: int = 0):
    """MMLU per-question results: uniform levels at keep 0.6 / 0.9 and dense, the policy at budget 0.7 (total keep
    0.75) answering correctly ``gain`` more often (relative) than the uniform front there."""
    rng = np.random.default_rng(seed)
    base = dense_acc * 0.9
    rows, summary = [], []
    for method, budget, keep, p in (("uniform:a", np.nan, 0.6, base), ("uniform:b", np.nan, 0.9, base),
                                    ("dense", np.nan, 1.0, dense_acc), ("policy", 0.7, 0.75, base * (1 + gain))):
        acc = (rng.random(n) < p).astype(float)
        rows += [dict(method=method, budget=budget, task="t", doc_id=i, acc=a, acc_norm=a, gold_ll=-1.0 + a)
                 for i, a in enumerate(acc)]
        summary.append(dict(method=method, budget=budget, acc=acc.mean(), acc_norm=acc.mean(), questions=n,
                            flop_keep=keep - (0.02 if method == "policy" else 0), total_keep=keep,
                            token_keep=1.0, prune_keep=1.0, bit_ratio=keep))  # levels on the bits axis
    pd.DataFrame(rows).to_csv(res / "mmlu.questions.csv", index=False)
    pd.DataFrame(summary).to_csv(res / "mmlu.csv", index=False)


@pytest.mark.parametrize("gain, dense_acc, verdict", [(0.6, 0.5, "reproduced"), (-0.3, 0.5, "not reproduced"),
                                                      (0.03, 0.27, "not testable at this scale"),
                                                      (0.03, 0.5, "not reproduced")])
def test_mmlu_claim_verdicts(tmp_path, gain, dense_acc, verdict):
    """Claim 1 at the pre-registered budget on the relative gain's CI: reproduced (excludes 0, reaches +7.3 %),
    not reproduced (below +7.3 %, or undecided above chance), not testable only at chance; gold log-likelihood
    beside accuracy."""
    res = _results(tmp_path)
    _mmlu(res, gain, dense_acc)
    c = {c["id"]: c for c in compute_claims(res, claim_budget=0.7)}["mmlu_gain_over_uniform"]
    assert c["verdict"] == verdict, c["ours"]
    assert "pre-registered budget 0.7" in c["ours"] and "gold-choice log-likelihood" in c["ours"]
    assert c["detail"]["total_keep"] == 0.75
    assert {c["id"]: c for c in compute_claims(res, claim_budget=0.9)}["mmlu_gain_over_uniform"][
        "verdict"] == "not testable at this scale"  # no policy run at 0.9


def test_adherence_below_the_grid_floor(tmp_path):
    """A budget below the cheapest schedule's keep (keep_floor) is judged against the floor and named as out of reach."""
    res = _results(tmp_path)
    ppl = pd.read_csv(res / "ppl.csv")
    ppl["keep_floor"] = 0.7
    low = ppl.budget == 0.6
    ppl.loc[low & (ppl.method == "policy"), ["flop_keep", "total_keep"]] = 0.71  # the floor, as close as possible
    ppl.to_csv(res / "ppl.csv", index=False)
    c = {c["id"]: c for c in compute_claims(res)}
    assert c["budget_adherence"]["verdict"] == "reproduced"
    assert "below the grid's floor 0.700" in c["budget_adherence"]["ours"]
    ppl.loc[low & (ppl.method == "policy"), ["flop_keep", "total_keep"]] = 0.78  # wasteful: well above the floor
    ppl.to_csv(res / "ppl.csv", index=False)
    assert {c["id"]: c["verdict"] for c in compute_claims(res)}["budget_adherence"] == "not reproduced"


def test_report_and_check(tmp_path):
    (tmp_path / "r").mkdir()
    res = _results(tmp_path / "r")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: x\n")
    _uniform_and_oracle(res, 0.1)
    build_report(res, cfg, "tiny-llama")
    assert (res / "pareto_ppl.pdf").is_file() and (res / "pareto_ppl.png").is_file()
    assert (res / "damage_curves.pdf").is_file() and (res / "table_headroom.md").is_file()
    assert (res / "claims.md").is_file() and (res / "random_violin.pdf").is_file()
    index = (res / "index.md").read_text()  # the one page: verdicts, every figure that exists, the tables
    assert "(claims.md)" in index and "![pareto_ppl](pareto_ppl.png)" in index and "(table_headroom.md)" in index
    assert index.count("| **") == len(json.loads((res / "claims.json").read_text())["claims"])
    assert check(res, cfg) == [] and sanity(res) == []
    doc = json.loads((res / "claims.json").read_text())
    doc["claims"][1]["verdict"] = "not reproduced"
    (res / "claims.json").write_text(json.dumps(doc))
    assert any("front_beats_fixed" in p for p in check(res, cfg))
    cfg.write_text("name: y\n")
    assert any("config_sha256" in p for p in check(res, cfg))


def _tamper_block_nll(res):
    b = pd.read_csv(res / "ppl.blocks.csv")
    b.loc[(b.method == "policy") & (b.block == 3), "nll"] += 0.5
    b.to_csv(res / "ppl.blocks.csv", index=False)


def _tamper_summary(res, column, delta):
    s = pd.read_csv(res / "ppl.csv")
    s.loc[(s.method == "policy") & np.isclose(s.budget, 0.8), column] += delta
    s.to_csv(res / "ppl.csv", index=False)


def _tamper_claims(res, edit):
    doc = json.loads((res / "claims.json").read_text())
    edit(doc)
    (res / "claims.json").write_text(json.dumps(doc))


TAMPER = {
    "per-block nll": (_tamper_block_nll, ["ppl.blocks.csv"]),
    "summary ppl": (lambda r: _tamper_summary(r, "ppl", -0.3), ["ppl.csv"]),
    "summary keep": (lambda r: _tamper_summary(r, "flop_keep", -0.02), ["flop_keep"]),
    "ours text": (lambda r: _tamper_claims(r, lambda d: d["claims"][1].update(ours="better everywhere")), ["ours"]),
    "verdict": (lambda r: _tamper_claims(r, lambda d: d["claims"][3].update(
        verdict="not reproduced" if d["claims"][3]["verdict"] == "reproduced" else "reproduced")), ["verdict"]),
    "claims.md": (lambda r: (r / "claims.md").write_text((r / "claims.md").read_text().replace("**", "", 2)),
                  ["claims.md"]),
    "input file": (lambda r: (r / "mmlu.questions.csv").write_text(
        (r / "mmlu.questions.csv").read_text().replace("1.0,1.0", "0.0,1.0", 1)), ["mmlu.questions.csv"]),
    "malformed input": (lambda r: (r / "mmlu.questions.csv").write_text("method,budget,acc\n"),
                        ["mmlu.questions.csv"]),
    "git commit": (lambda r: _tamper_claims(r, lambda d: d["provenance"].update(git_commit="f" * 40)),
                   ["git_commit"]),
}


@pytest.mark.parametrize("what", list(TAMPER))
def test_check_fails_on_every_tampering(tmp_path, what):
    """A report that passes the check, copied and tampered with in one place, fails it, naming the place."""
    import subprocess

    res = tmp_path / "r"
    res.mkdir()
    _results(res)
    _uniform_and_oracle(res, 0.1)
    pd.DataFrame([{"task": "t", "doc_id": 0, "acc": 1.0, "acc_norm": 1.0, "method": "dense", "budget": np.nan}]
                 ).to_csv(res / "mmlu.questions.csv", index=False)
    pd.DataFrame([{"method": "dense", "budget": np.nan, "acc": 1.0, "acc_norm": 1.0, "questions": 1, "steps": 3,
                   **dict.fromkeys(("flop_keep", "total_keep", "token_keep", "prune_keep", "bit_ratio"), 1.0)}]
                 ).to_csv(res / "mmlu.csv", index=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: x\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    build_report(res, cfg, "tiny-llama")
    _tamper_claims(res, lambda d: d["provenance"].update(git_commit=head.strip()))
    doc = json.loads((res / "claims.json").read_text())
    (res / "claims.md").write_text(claims_markdown(doc["claims"], doc["provenance"], caveats(res)))
    assert check(res, cfg) == [], check(res, cfg)
    tamper, needles = TAMPER[what]
    tamper(res)
    problems = check(res, cfg)
    assert problems and any(n in p for p in problems for n in needles), problems


def _uniform_and_oracle(res, oracle_gain: float):
    """A true-uniform front nll = 3 − keep (+ dense at 1.0) and an oracle ``oracle_gain`` nats below it, same blocks."""
    rng = np.random.default_rng(1)
    frames = {}
    for name, methods in (("ppl_uniform", [("uniform:a", None, 0.5), ("uniform:b", None, 0.9), ("dense", None, 1.0)]),
                          ("ppl_oracle", [("oracle-greedy", 0.6, 0.55), ("oracle-greedy", 0.8, 0.9)])):
        rows, blocks = [], []
        for method, budget, keep in methods:
            nll = 3.0 - keep - (oracle_gain if name == "ppl_oracle" else 0.0) + rng.normal(0, 0.01, 20)
            row, per = _rows(method, np.nan if budget is None else budget, nll, keep)
            rows.append(row)
            blocks += per
        pd.DataFrame(rows).to_csv(res / f"{name}.csv", index=False)
        pd.DataFrame(blocks).to_csv(res / f"{name}.blocks.csv", index=False)


def test_headroom_captured_claim(tmp_path):
    """policy is 0.05 nats below the uniform front (shift −0.05 vs matched at nll 3 − b): with an oracle 0.1 below,
    it captures about half of the headroom; with an oracle that ties uniform there is nothing to capture."""
    from sol.report import headroom_table

    res = _results(tmp_path)
    _uniform_and_oracle(res, 0.1)
    table = headroom_table(res)
    # matched at total keep (0.01 above the LM-only keep here): the front is 0.01 nats better there, ≈ 0.04 / 0.11
    assert len(table) == 2 and ((table.captured > 0.2) & (table.captured < 0.7)).all()
    assert (table.captured_lo < table.captured).all() and (table.headroom_lo > 0).all()
    claim = {c["id"]: c for c in compute_claims(res)}["headroom_captured"]
    assert claim["verdict"] == "reproduced"
    _uniform_and_oracle(res, 0.0)
    claim = {c["id"]: c for c in compute_claims(res)}["headroom_captured"]
    assert claim["verdict"] == "not testable at this scale"


def test_no_comparison_across_a_cliff_of_the_front():
    from sol.report import _dense_enough

    front = pd.DataFrame({"method": ["u4", "u5", "dense"], "budget": [np.nan] * 3, "flop_keep": [0.58, 0.62, 1.0],
                          "ppl": [1700.0, 33.0, 14.0]})
    assert not _dense_enough(front, 0.60)   # the chord between 4-bit and 5-bit says nothing about true uniform
    assert not _dense_enough(front, 0.80)   # 33 → 14 differ by 2.4x > 2
    assert _dense_enough(front.assign(ppl=[1700.0, 20.0, 14.0]), 0.80)
    assert not _dense_enough(front, 0.50)   # below the front's cheapest level


def test_caveats_say_the_uncomfortable_things(tmp_path):
    """claims.md names a fixed baseline that beats the policy with less compute, the static transforms' missing
    refresh and coinciding schedule baselines, from the data (and the check holds it to them)."""
    res = _results(tmp_path)
    _uniform_and_oracle(res, 0.1)
    assert not any("beats policy" in n for n in caveats(res))
    u = pd.read_csv(res / "ppl_uniform.csv")
    ub = pd.read_csv(res / "ppl_uniform.blocks.csv")
    row, per = _rows("weights:int8-g64", np.nan, np.full(20, 2.0), 0.55)  # better than the policy at 0.6, cheaper
    pd.concat([u, pd.DataFrame([row])]).to_csv(res / "ppl_uniform.csv", index=False)
    pd.concat([ub, pd.DataFrame(per)]).to_csv(res / "ppl_uniform.blocks.csv", index=False)
    notes = caveats(res)
    assert any(n.startswith("At budget 0.6 the fixed baseline `weights:int8-g64` beats policy") for n in notes)
    assert any("never get the dense model's KV" in n for n in notes)
    ppl, blocks = pd.read_csv(res / "ppl.csv"), pd.read_csv(res / "ppl.blocks.csv")
    for df in (ppl, blocks):  # EMC identical to matched at 0.8
        for col in [c for c in ("ppl", "ppl_lo", "ppl_hi", "nll") if c in df]:
            df.loc[(df.method == "emc") & np.isclose(df.budget, 0.8), col] = df.loc[
                (df.method == "matched") & np.isclose(df.budget, 0.8), col].to_numpy()
    ppl.to_csv(res / "ppl.csv", index=False)
    blocks.to_csv(res / "ppl.blocks.csv", index=False)
    assert any(n.startswith("At budget 0.8 EMC gives the matched mix's exact perplexity") for n in caveats(res))


def test_a_second_mmlu_style_is_a_checked_secondary_line(tmp_path):
    """mmlu_<style>.csv beside mmlu.csv (the pipeline's mmlu.style with several styles): claim 1 stays on the
    pre-registered style; claims.md adds claim 1's rule on the other style as a line of its own; its files are inputs
    of the check (hashed, summaries recomputed), so tampering with them fails it."""
    res = _results(tmp_path)
    _uniform_and_oracle(res, 0.1)
    _mmlu(res, 0.6, 0.5)
    main = {c["id"]: c for c in compute_claims(res, claim_budget=0.7)}["mmlu_gain_over_uniform"]
    for f in ("mmlu.csv", "mmlu.questions.csv"):
        (res / f).rename(res / f.replace("mmlu", "mmlu_letter"))
    _mmlu(res, -0.3, 0.5, seed=1)  # the claim's style: a loss
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("mmlu: {budgets: [0.7], claim_budget: 0.7}\n")
    claims = {c["id"]: c for c in build_report(res, cfg, "tiny-llama")}
    assert claims["mmlu_gain_over_uniform"]["verdict"] == "not reproduced"
    md = (res / "claims.md").read_text()
    assert f"Claim 1's rule on the letter MMLU style (run beside it; not the pre-registered style): {main['ours']} " \
           f"→ reproduced." in md
    assert check(res, cfg) == []
    assert {"mmlu_letter.csv", "mmlu_letter.questions.csv"} <= set(json.loads(
        (res / "claims.json").read_text())["provenance"]["inputs"])
    q = res / "mmlu_letter.questions.csv"
    q.write_text(q.read_text().replace("1.0,1.0", "0.0,1.0", 1))
    problems = check(res, cfg)
    assert any("mmlu_letter.questions.csv" in p for p in problems), problems
