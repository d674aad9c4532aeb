"""Registry kind `task`: one module (or package) per task; modules here register themselves."""
