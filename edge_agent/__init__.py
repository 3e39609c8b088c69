"""edge-agent: run one LLM together across independently owned devices, layer by layer."""

import os as _os

__version__ = "0.1.0"

# llama.cpp's CPU threads are OpenMP's, which by default spin for a while after every
# parallel region. A node shares its device with its owner's work, and on one machine a
# client and its peers take turns: spinning threads steal the cores the next one computes
# on (measured on 2 busy cores: 3-18 tok/s spinning vs 29-39 passive, docs/benchmarks.md).
# Set before llama.cpp's libraries load; the user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
