"""Run several `mergekit-yaml` configurations in one MergeKit process (MergeKit's own
`run_merge`, as its CLI calls it), so a test module pays MergeKit's start-up once.

    .venv-mergekit/bin/python tests/reference/mergekit_batch.py JOBS.json

JOBS.json: {"cwd": dir, "jobs": [{"config": path, "out": path}, ...]}; each job runs with
the options the tests give the CLI (`--no-copy-tokenizer --no-write-model-card --quiet
--random-seed 0`; a job with "copy_tokenizer": true copies it), the seed set again before
each job as a fresh CLI process would.
"""

import json
import os
import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    os.chdir(spec["cwd"])
    for job in spec["jobs"]:
        options = MergeOptions(copy_tokenizer=bool(job.get("copy_tokenizer")), write_model_card=False, quiet=True,
                               random_seed=0)
        options.apply_global_options()
        with open(job["config"], encoding="utf-8") as f:
            source = f.read()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), job["out"], options=options,
                  config_source=source)


if __name__ == "__main__":
    main(sys.argv[1])
