"""Demo datasets and their behaviour checks (see make_examples.py)."""
