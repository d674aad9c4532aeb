"""Registry kind `compressor`: one module per component; modules here register themselves."""
