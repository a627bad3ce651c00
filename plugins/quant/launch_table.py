"""Launch settings of the quantized one-row GEMVs by weight shape: each kernel module keeps a
default and a table of the shapes ``benchmarks/tune_quant_gemv.py --sweep`` measured."""

from __future__ import annotations


def launch_settings(kernel: str, default: dict, table: dict[tuple, dict], fields: tuple[str, ...], shape: tuple,
                    config: dict | None = None) -> dict:
    """The settings for a weight of ``shape`` (the table's key): ``config``, else ``table``'s entry
    for ``shape``, else ``default``; a field missing from the one chosen is the default's. A field
    not in ``fields`` is a ValueError naming ``kernel``."""
    chosen = config or table.get(shape, default)
    unknown = set(chosen) - set(fields)
    if unknown:
        raise ValueError(f"{kernel} launch settings {sorted(unknown)}: expected fields of {fields}")
    return {**default, **chosen}
