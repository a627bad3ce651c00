"""Quantization plugins: each registers ``QuantMethod`` classes (hook ``register_quant_methods``)."""
