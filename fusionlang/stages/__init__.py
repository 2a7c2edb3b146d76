"""Model stages (../shared/DESIGN.md, "Next: model-level stages"): work that loads whole
models (or one block at a time) and runs forward/backward passes over a `data` value —
statistics (Fisher diagonals, Gram matrices for RegMean, Wanda/SparseGPT calibration),
test-time adaptation (AdaMerging, representation surgery) and router initialisation. A
stage returns model-shaped results: a lazy map from tensor name to a statistic, which
tensor stages read like models. Empty until the data-dependent methods land."""
