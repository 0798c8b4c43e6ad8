"""OCV tables generated from the PyBaMM parameter sets (make_ocv.py)."""
