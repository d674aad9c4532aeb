"""Registry kind `scorer`: one module per component; modules here register themselves."""
