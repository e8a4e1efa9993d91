"""pass@k the way HF evaluate's `code_eval` (which lm-eval's humaneval calls) computes it, written independently of
lmforge: each candidate program plus its tests runs in a plain Python subprocess (NO sandbox: a test-only
metric, run on scripted completions), and the unbiased estimator is Codex's numpy formula."""
import subprocess
import sys

import numpy as np


def _estimate(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))


def pass_at_k(references, predictions, k=None):
    ks = [k] if isinstance(k, int) else list(k)
    correct = []
    for test, candidates in zip(references, predictions):
        passed = 0
        for program in candidates:
            try:
                proc = subprocess.run([sys.executable, "-c", program + "\n" + test], capture_output=True, timeout=10)
                passed += proc.returncode == 0
            except subprocess.TimeoutExpired:
                pass
        correct.append((len(candidates), passed))
    return {f"pass@{kk}": float(np.mean([_estimate(n, c, kk) for n, c in correct])) for kk in ks
            if all(n >= kk for n, _ in correct)}
