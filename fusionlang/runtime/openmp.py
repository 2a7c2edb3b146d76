"""How OpenMP's idle threads wait (no torch: called before torch loads libgomp, which
reads its settings once, when it is loaded).

Measured on this project's 2-CPU KVM machine (2026-12-05), torch 2.13.0 (libgomp):

| setting                                    | TIES over 8 experts of W1, idle | 135M forward pass, 2 busy jobs beside |
|--------------------------------------------|------:|------:|
| libgomp's default (300000 spins, ~3 ms)     | 20–22 s | 3.9–4.1 s |
| OMP_WAIT_POLICY=PASSIVE (sleep at once)     | 64–71 s | 1.7–2.0 s |
| PASSIVE, GOMP_SPINCOUNT=30000 (~0.3 ms)     | 15–18 s | 2.1–2.3 s |

(TIES: `fusionlang run` of a spec merging 8 experts with `ties(base, experts,
density=0.2)`, merge time; the default's 22 s is the wall time, compile included, of a
`fusionlang.run` call with both variables unset, 20 s the command line with
GOMP_SPINCOUNT=300000. Under two busy jobs the same TIES run takes 64.7 s sleeping at
once and 80.3 s with the short spin.)

A merge opens hundreds of thousands of short parallel regions (one per op and tile); a
thread that sleeps at once is woken through the kernel for every one of them (1.75 M
context switches in the 64 s run, half its time in the kernel). A thread that spins
for milliseconds holds a core that other processes on shared cores need. A short spin
keeps both cases near their best.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "30000"


def set_wait_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT=SPIN_COUNT in `environ` unless the
    user set either (theirs is kept whole). Takes effect only if called before torch is
    first imported in this process; child processes inherit it."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
