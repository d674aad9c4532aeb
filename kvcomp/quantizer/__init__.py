"""Registry kind `quantizer`: one module per component; modules here register themselves."""
