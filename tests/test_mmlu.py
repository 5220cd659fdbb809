"""MMLU offline data, generated lm-eval tasks, and the `sol` lm-eval model (dense equals lm-eval's hf model)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from sol import mmlu

SUBTASKS = ["sol_mmlu_anatomy_continuation", "sol_mmlu_virology_letter", "sol_mmlu_formal_logic_continuation_5shot"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return mmlu.prepare(tmp_path_factory.mktemp("mmlu"))


def test_data_counts():
    test = mmlu.load_test()
    assert len(test) == 14042 and len({r["subject"] for r in test}) == 57
    assert sum(r["subject"] == "professional_law" for r in test) == 1534
    first = next(r for r in test if r["subject"] == "elementary_mathematics")
    assert first["question"] == "What is the value of p in 24 = 2p?" and first["answer"] == 2
    dev = mmlu.load_dev()
    assert sum(map(len, dev.values())) == 281
    assert {k: len(v) for k, v in dev.items() if len(v) < 5} == {"college_chemistry": 3, "formal_logic": 4,
                                                                  "human_aging": 4}


def test_tasks_written(tasks):
    names = {p.stem for p in tasks.rglob("*.yaml")}
    assert len(names) == 4 * 57 + 4 and "_sol_mmlu_continuation_5shot" in names


def test_sol_model_equals_hf_model(tasks, tiny_llama):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from sol.models import byte_tokenizer
    from sol.lm_eval_model import SolLM

    tok = byte_tokenizer()
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    kw = dict(tasks=SUBTASKS, task_manager=tm, limit=6, bootstrap_iters=0, log_samples=True)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=tiny_llama, tokenizer=tok, device="cpu", batch_size=8), **kw)
    lm = SolLM(model="tiny-llama", pretrained=tiny_llama, tokenizer=tok)
    ours = lm_eval.simple_evaluate(model=lm, **kw)
    for t in SUBTASKS:
        assert ours["results"][t]["acc,none"] == ref["results"][t]["acc,none"]
        la = np.array([[x[0][0] for x in s["resps"]] for s in ref["samples"][t]])
        lb = np.array([[x[0][0] for x in s["resps"]] for s in ours["samples"][t]])
        assert np.abs(la - lb).max() < 1e-3
    assert lm.usage()["flop_keep"] == 1.0 and lm.usage()["steps"] > 0
    cheap = SolLM(model="tiny-llama", controller="uniform:0.5,0.5,6", pretrained=tiny_llama, tokenizer=tok)
    lm_eval.simple_evaluate(model=cheap, **kw)
    assert cheap.usage()["flop_keep"] < 0.8


def test_lm_eval_cli_passthrough(tasks, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sol.cli", "lm-eval", "--model", "sol", "--model_args",
                        "model=tiny-llama,controller=uniform:1/0.5/8", "--tasks", SUBTASKS[0], "--include_path",
                        str(tasks), "--limit", "3", "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                            "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                            "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sol_mmlu_anatomy_continuation" in r.stdout and list((tmp_path / "out").rglob("results_*.json"))


@pytest.mark.parametrize("controller", ["dense", "uniform:0.1,0.6,5", "matched:grid=J-3L,token_keep=0.4,bits=8"])
def test_batched_scoring_equals_one_question_at_a_time(tiny_llama, controller):
    """Ragged cross-question batches give each question exactly what it gets scored alone (and the same usage);
    half the contexts share a few-shot prefix (computed once), half are 0-shot."""
    from types import SimpleNamespace

    from sol.lm_eval_model import SolLM
    from sol.models import byte_tokenizer

    tok = byte_tokenizer()
    qs = [q for q in mmlu.load_test() if q["subject"] == "virology"][:12]
    shots = "".join(f"Question: {q['question'].strip()}\nAnswer: {q['choices'][q['answer']]}\n\n" for q in qs[-2:])
    reqs = [SimpleNamespace(args=((shots if i % 2 else "") + f"Question: {q['question'].strip()}\nAnswer:", " " + c))
            for i, q in enumerate(qs[:-2]) for c in q["choices"]]
    scores, usage = [], []
    for groups in (1, 16):
        lm = SolLM(model="tiny-llama", controller=controller, budget=0.7, pretrained=tiny_llama, tokenizer=tok,
                   batch_groups=groups)
        scores.append(np.array([s[0] for s in lm.loglikelihood(reqs, disable_tqdm=True)]))
        usage.append(lm.usage())
    assert np.abs(scores[0] - scores[1]).max() < 1e-4
    assert usage[0]["steps"] == usage[1]["steps"]
    assert usage[0]["flop_keep"] == pytest.approx(usage[1]["flop_keep"], abs=1e-9)


def test_matched_mix_realises_a_total_keep_on_the_same_questions(tiny_llama):
    """MMLU's matched mix is matched on the questions just scored: a dry rollout over the recorded ragged batches
    spends exactly what the real run spends, and the bisected targets realise the goal keep within one step."""
    from types import SimpleNamespace

    from baselines.schedules import EntropyController, Matched, flop_matched_targets
    from sol.lm_eval_model import SolLM
    from sol.models import byte_tokenizer
    from sol.registry import Built

    tok = byte_tokenizer()
    qs = [q for q in mmlu.load_test() if q["subject"] == "anatomy"][:8]
    reqs = [SimpleNamespace(args=(f"Question: {q['question'].strip()}\nAnswer:", " " + c)) for q in qs
            for c in q["choices"]]
    lm = SolLM(model="tiny-llama", controller="uniform:0.5,1,8", pretrained=tiny_llama, tokenizer=tok,
               batch_groups=4)
    lm.loglikelihood(reqs, disable_tqdm=True)
    grid = lm.built.grid
    goal = 0.8
    targets = flop_matched_targets(grid, {"token_keep": 0.6, "prune_keep": 1.0, "bits": 8}, goal, iters=30,
                                   keep_of=lambda c: lm.spend(c)["flop_keep"])
    dry = lm.spend(Matched(grid, targets))
    real = SolLM(model="tiny-llama", controller=Built(Matched(grid, targets), grid), pretrained=tiny_llama,
                 tokenizer=tok, batch_groups=4)
    real.loglikelihood(reqs, disable_tqdm=True)
    assert real.usage() == dry  # the books of a dry run are the real run's
    with pytest.raises(ValueError, match="open-loop"):  # a controller that reads the LM cannot be run dry
        lm.runtime.rollout(*lm.scored[0][:1], EntropyController(grid, targets), 1.0, lm.scored[0][3], dry=True)
    # rows of equal continuation length follow the same schedule, so the keep is a step function of the targets whose
    # jumps are a few steps wide: within 4 steps' largest swing of the goal
    table = lm.runtime.cost.keep_table(grid, 16)
    assert abs(dry["flop_keep"] - goal) <= 4 * float(table.max() - table.min()) / dry["steps"]


def test_exported_model_scores_the_same_under_lm_evals_hf_and_sol(tasks, tmp_path):
    """`sol export` writes a plain HF folder: lm-eval's own `hf` model (kept by the passthrough) and our dense `sol`
    model load it and give the same accuracy and per-choice log-likelihoods, through the real CLIs."""
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    folder = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "sol.cli", "export", "tiny-llama", str(folder)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "quantization_config" not in (folder / "config.json").read_text(), r.stderr[-2000:]
    got = {}
    for name, args in (("hf", f"pretrained={folder},dtype=float32"), ("sol", f"model={folder},controller=dense")):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "sol.cli", "lm-eval", "--model", name, "--model_args", args,
                            "--tasks", SUBTASKS[0], "--include_path", str(tasks), "--limit", "6", "--device", "cpu",
                            "--output_path", str(out), "--log_samples"], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(next(out.rglob("results_*.json")).read_text())["results"][SUBTASKS[0]]
        samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
        got[name] = res["acc,none"], [[float(x[0]) for x in s["filtered_resps"]] for s in samples]
    assert got["hf"][0] == got["sol"][0]
    np.testing.assert_allclose(got["hf"][1], got["sol"][1], atol=1e-4)


def test_a_cache_written_as_a_gguf_folder_becomes_a_plain_one(tmp_path):
    from sol.models import _plain_config

    cfg = {"model_type": "llama", "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _plain_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}
