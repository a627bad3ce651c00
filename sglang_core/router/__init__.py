"""Data parallelism: several engine replicas behind one front, and the router that spreads
requests over them (``--dp-size`` in one server, or ``sglang-core router`` in front of several)."""
