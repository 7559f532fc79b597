"""Built-in plugins. Each module registers through ``framework.hookspecs`` like a third-party one."""
