"""Evaluation: sliding-window perplexity (`perplexity`) and the lm-evaluation-harness model `zamba2`
(`harness`, imported on demand because lm-eval is an optional dependency), with offline tasks in `tasks/`."""
