"""``opaque_to_compiler``: marks a kernel launcher that ``torch.compile`` must call as it is.

With ``--enable-torch-compile`` Dynamo stops its graph at such a function and runs it eagerly.
Inductor cannot re-trace our Triton kernels (they call ``@triton.jit`` helpers and launch with
programmatic dependent launch), and tracing them would gain nothing: they are already fused.
Inside a captured CUDA graph the break costs nothing.
"""

from __future__ import annotations

import torch

opaque_to_compiler = torch.compiler.disable
