"""Built-in quantization plugins, one folder per scheme: each registers ``QuantMethod`` classes
(hook ``register_quant_methods``) under the checkpoint's ``quant_method`` names."""
