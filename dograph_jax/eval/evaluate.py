"""Zero-shot benchmarks of a trained run with lm-evaluation-harness.

    python experiments/evaluate.py --run_dir runs/default            # the paper's nine tasks
    python experiments/evaluate.py --run_dir R --tasks piqa,sciq --limit 200
    python experiments/evaluate.py --run_dir R --tasks my_task --include_path my_tasks/

The model is the run's last complete checkpoint (``--step`` for another;
for an offline method's pipeline, its final stage's) with the run's own tokenizer (``dograph_jax/eval/lm_eval_model.py``). The default
tasks are the paper's Table 1: HellaSwag, PiQA, OpenBookQA, COPA, LogiQA,
WinoGrande, SciQ, ARC-Easy and Lambada (OpenAI), zero-shot; each is reported
by its normalised accuracy where the task has one (``acc_norm``), else its
accuracy (``acc``), else its first metric (e.g. a rolling perplexity task's
``word_perplexity``). ``--include_path`` adds a directory of task YAML files
(e.g. ``dataset_path: json`` over local JSONL).

Offline by design: ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` are set
unless the environment already sets them (``--online`` clears them), so a
task whose data is not on the machine fails at once with a message saying
how to make it available, instead of waiting on the network. Each task is
loaded on its own: the others still run, and the unavailable ones are listed
in ``eval.md`` and make the exit status 1.

Writes ``eval.json`` (every metric lm-eval reported, the primary metric per
task, their mean, the checkpoint step and the command) and ``eval.md`` into
the run directory (``--out`` for another) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence


log = logging.getLogger("evaluate")

PAPER_TASKS = ("hellaswag", "piqa", "openbookqa", "copa", "logiqa", "winogrande", "sciq",
               "arc_easy", "lambada_openai")  # the paper's Table 1
# Preferred metric per task, in order: normalised accuracy where it exists.
PRIMARY = ("acc_norm", "acc", "exact_match", "word_perplexity", "perplexity")
MISSING_DATA = (
    "the data of task {task!r} is not on this machine ({error}). Evaluation runs "
    "offline (HF_DATASETS_OFFLINE=1): put the data set in the HuggingFace cache "
    "beforehand (on a machine with network: `python -c \"import datasets; "
    "datasets.load_dataset('<dataset_path>', '<dataset_name>')\"`, then copy "
    "~/.cache/huggingface to this one or point HF_HOME at it), or write a local "
    "task YAML with `dataset_path: json` and `dataset_kwargs: {{data_files: ...}}` "
    "and pass its directory with --include_path; --online allows downloads.")


def set_offline(online: bool) -> None:
  """Offline unless asked otherwise (before ``datasets`` is imported)."""
  for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    if online:
      os.environ.pop(name, None)
    else:
      os.environ.setdefault(name, "1")


def primary_metric(metrics: dict) -> tuple[str, float] | None:
  """``(name, value)`` of a task's preferred metric in lm-eval's results."""
  by_name = {k.split(",")[0]: v for k, v in metrics.items()
             if "," in k and not k.split(",")[0].endswith("_stderr")}
  for name in PRIMARY:
    if name in by_name and isinstance(by_name[name], (int, float)):
      return name, float(by_name[name])
  numeric = [(k, float(v)) for k, v in by_name.items() if isinstance(v, (int, float))]
  return numeric[0] if numeric else None


def load_tasks(names: Sequence[str], include_path: str | None):
  """``(task_dict, failures)``: each task loaded on its own; ``failures``
  maps a task that could not be loaded to the reason."""
  from lm_eval.tasks import TaskManager, get_task_dict
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  tasks, failures = {}, {}
  for name in names:
    if name not in manager.all_tasks:
      failures[name] = (f"unknown task {name!r} (not in lm-eval's registry"
                        + (f" nor in {include_path}" if include_path else
                           "; local YAML tasks need --include_path") + ")")
      continue
    try:
      tasks.update(get_task_dict([name], manager))
    except Exception as e:  # noqa: BLE001 - the data set layer raises many kinds
      failures[name] = MISSING_DATA.format(task=name, error=f"{type(e).__name__}: {e}")
  return tasks, failures


def evaluate(lm, tasks: Sequence[str], *, include_path: str | None = None,
             limit: float | None = None, num_fewshot: int = 0,
             bootstrap_iters: int = 1000) -> dict:
  """Runs ``tasks`` on the lm-eval model ``lm``; returns the ``eval.json`` dict."""
  from lm_eval import evaluator
  task_dict, failures = load_tasks(tasks, include_path)
  results = {}
  if task_dict:
    for task in task_dict.values():  # zero-shot unless asked
      if hasattr(task, "set_config"):
        task.set_config(key="num_fewshot", value=num_fewshot)
    out = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit,
                             bootstrap_iters=bootstrap_iters, log_samples=False)
    results = out["results"]
  per_task = {}
  for name in tasks:
    if name in results:
      metric = primary_metric(results[name])
      per_task[name] = {"metrics": {k: v for k, v in results[name].items()
                                    if isinstance(v, (int, float))},
                        "primary": metric[0] if metric else None,
                        "value": metric[1] if metric else None}
  accuracies = [t["value"] for t in per_task.values()
                if t["primary"] in ("acc_norm", "acc") and t["value"] is not None]
  return {"tasks": per_task, "failed": failures, "num_fewshot": num_fewshot, "limit": limit,
          "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None}


def markdown(result: dict, title: str) -> str:
  lines = [f"# {title}", "", "| task | metric | value | stderr |", "|---|---|---|---|"]
  for name, t in result["tasks"].items():
    stderr = t["metrics"].get(f"{t['primary']}_stderr,none")
    lines.append(f"| {name} | {t['primary']} | {t['value']:.4f} | "
                 + (f"{stderr:.4f} |" if isinstance(stderr, (int, float)) else "— |"))
  if result["mean_accuracy"] is not None:
    lines.append(f"| **mean** (accuracy tasks) | | {result['mean_accuracy']:.4f} | |")
  if result["failed"]:
    lines += ["", "Not evaluated:", ""]
    lines += [f"- {name}: {why}" for name, why in result["failed"].items()]
  return "\n".join(lines) + "\n"


def model_dir(run_dir: str | Path) -> Path:
  """The run directory holding the model of ``run_dir``: itself, or for an
  offline method's pipeline (``dograph_jax/train/offline.py``) its final stage."""
  run_dir = Path(run_dir)
  final = run_dir / "stages" / "final"
  if not (run_dir / "checkpoints").is_dir() and (final / "checkpoints").is_dir():
    return final
  return run_dir


def evaluate_run(run_dir: str | Path, tasks: Sequence[str], *, out: str | Path | None = None,
                 step: int | None = None, include_path: str | None = None,
                 limit: float | None = None, num_fewshot: int = 0, batch_size: int = 16,
                 max_gen_toks: int = 256, mesh: str = "", bootstrap_iters: int = 1000,
                 command: str = "") -> dict:
  """Loads the run's checkpoint, evaluates, writes ``eval.json`` / ``eval.md``."""
  from dograph_jax import sharding
  from dograph_jax.eval.lm_eval_model import FlaxLM
  lm = FlaxLM.from_run_dir(model_dir(run_dir), step=step, batch_size=batch_size,
                           max_gen_toks=max_gen_toks,
                           mesh=sharding.make_mesh(mesh) if mesh else None)
  result = evaluate(lm, tasks, include_path=include_path, limit=limit,
                    num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters)
  result.update(run_dir=str(run_dir), step=lm.step, command=command,
                requested=list(tasks), include_path=include_path)
  out = Path(out or run_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "eval.json").write_text(json.dumps(result, indent=2))
  text = markdown(result, f"{run_dir} (step {lm.step}), {num_fewshot}-shot")
  (out / "eval.md").write_text(text)
  print(text)
  return result


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run_dir", required=True)
  parser.add_argument("--tasks", default=",".join(PAPER_TASKS),
                      help="comma-separated lm-eval task names (default: the paper's nine)")
  parser.add_argument("--include_path", default=None, help="directory of local task YAML")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
  parser.add_argument("--out", default=None, help="where eval.json/eval.md go (default: run_dir)")
  parser.add_argument("--limit", type=float, default=None,
                      help="documents per task (an int), or a fraction of them")
  parser.add_argument("--num_fewshot", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_gen_toks", type=int, default=256)
  parser.add_argument("--mesh", default="", help="e.g. data=8: rows sharded over devices")
  parser.add_argument("--bootstrap_iters", type=int, default=1000)
  parser.add_argument("--online", action="store_true", help="allow dataset downloads")
  args = parser.parse_args(argv)
  set_offline(args.online)
  limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
  result = evaluate_run(
      args.run_dir, [t for t in args.tasks.split(",") if t], out=args.out, step=args.step,
      include_path=args.include_path, limit=limit, num_fewshot=args.num_fewshot,
      batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, mesh=args.mesh,
      bootstrap_iters=args.bootstrap_iters,
      command="python experiments/evaluate.py " + " ".join(shlex.quote(a) for a in argv))
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
