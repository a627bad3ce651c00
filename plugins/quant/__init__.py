"""Built-in quantization plugins: one folder per checkpoint ``quant_method``."""
