"""Evaluation: the lm-evaluation-harness model over a Flax run
(``lm_eval_model.FlaxLM``) and ``evaluate`` (tasks over a run directory).
Needs the ``eval`` extra (lm-evaluation-harness) when a task runs; the
module itself imports it lazily, so ``compare`` loads without it."""
