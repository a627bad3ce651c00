"""Length regimes: for a model whose cached K depends on how long its sequence is.

A model declares ``kv_recompute_length`` (an int attribute; absent or None: no regimes) when the
K it computes for a sequence of at most that many tokens differs from what it computes for a
longer one, and its reference recomputes the whole sequence when it grows past that length
(Phi-3's LongRoPE: transformers' ``generate`` drops its KV cache there and turns every token by
the long factors). A sequence is in regime 0 up to that length and in regime 1 past it; a request
holds its KV in one regime (``Req.kv_regime``), chosen when it is admitted, by its whole length.

The scheduler then retracts a running request whose next step takes its sequence into the other
regime, and prefills it again, output included (``Admission.retract_to_recompute``), and the
prefix cache keys tokens by the regime that computed them (its namespace), so a request reuses
only tokens of its own regime. A model without one pays nothing: the scheduler holds None.
"""

from __future__ import annotations

from torch import nn

from sglang_core.request import Req


class LengthRegimes:
    def __init__(self, recompute_length: int):
        self.recompute_length = recompute_length

    def of(self, length: int) -> int:
        """The regime of a sequence of ``length`` tokens."""
        return int(length > self.recompute_length)

    def crossing(self, running: list[Req]) -> list[Req]:
        """The running requests whose next step's sequence is in another regime than their KV.
        That step ends at ``fill_len`` tokens, or at ``kv_len + 1`` while a decode step is in
        flight (its input token, not yet on the host, is then the one after ``kv_len``)."""
        return [r for r in running if r.kv_regime != self.of(max(r.fill_len, r.kv_len + 1))]


def length_regimes(model: nn.Module) -> LengthRegimes | None:
    """The model's regimes, or None when it declares no ``kv_recompute_length``."""
    length = getattr(model, "kv_recompute_length", None)
    return None if length is None else LengthRegimes(length)
