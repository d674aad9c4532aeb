"""Registry kind `logger`: one module per component; modules here register themselves."""
