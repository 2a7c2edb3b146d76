"""Running a plan: reading inputs, units, the runner, schedulers and sinks.

- `sources`   model directories and safetensors headers (compile time too; no torch)
- `outputs`   the save-path rules and the leftovers of killed runs (no torch)
- `errors`    RunError, the located failure of a run (no torch)
- `reader`    tensors read lazily from mapped safetensors files; devices
- `units`     a phase of the plan split into units: a tensor group's targets, the
              nodes it computes and the values it takes from other units (no torch)
- `runner`    computes a unit: a pure function of its inputs, tiled or not
- `sinks`     where results go: shard writers and the all-or-nothing commit
- `model_files`  what travels with an output besides its weights (config, tokenizer, card)
- `scheduler` the local scheduler (`run_plan`): units in order, results to the sink

A GPU pipeline or a Ray executor is another scheduler over the same units and runner
(../shared/DESIGN.md, "The executor as units"). Nothing is imported here, so that the
torch-free modules stay cheap to import (`fusionlang check`).
"""
