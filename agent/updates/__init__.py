"""How a new model gets into service: the update manager (fetch, verify, validate, swap, health window, keep or roll back)."""
