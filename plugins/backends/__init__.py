"""Built-in API backends of the frontend language (``sgl.RuntimeEndpoint``, ...)."""
