"""`python -m train`: config, data, step, loop, report."""
