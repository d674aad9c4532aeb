"""Registry kind `propagator`: one module per component; modules here register themselves."""
