"""Constrained decoding: the grammar-backend interface (``grammar.py``), the tokenizer's
vocabulary as bytes (``vocab.py``), compilation off the scheduler's path (``compiler.py``) and
the batched token mask (``mask.py``)."""
