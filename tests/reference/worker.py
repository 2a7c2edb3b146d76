"""One reference-tool process serving many jobs, so the test session pays the tool's
start-up (FusionBench imports for ~15 s) once instead of once per test case.

    .venv-fusionbench/bin/python tests/reference/worker.py

Protocol: one JSON line per job on stdin, {"script": path, "argv": [args]}; the worker
runs that script's `main()` with `sys.argv = [script, *args]`, exactly as
`python script args...` would, and answers one JSON line on its original stdout:
{"ok": true} or {"ok": false, "error": traceback}. Everything the scripts print goes to
stderr. Before each job torch's global generator is reset to the seed a fresh process
starts with, and Python's and NumPy's to a fixed seed, so a job's random draws do not
depend on the jobs before it.
"""

import importlib.util
import json
import os
import random
import sys
import traceback


def main() -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the scripts' own prints must not mix with the replies
    sys.stdout = sys.stderr
    import numpy as np
    import torch

    seed0 = torch.initial_seed()
    modules = {}
    for line in sys.stdin:
        job = json.loads(line)
        try:
            script = job["script"]
            if script not in modules:
                spec = importlib.util.spec_from_file_location(f"reference_{len(modules)}", script)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                modules[script] = mod
            torch.manual_seed(seed0)
            random.seed(0)
            np.random.seed(0)
            sys.argv = [script, *job["argv"]]
            modules[script].main()
            answer = {"ok": True}
        except BaseException:  # noqa: BLE001 - the test shows the reference's traceback
            answer = {"ok": False, "error": traceback.format_exc()[-4000:]}
        finally:
            torch.set_grad_enabled(True)
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
