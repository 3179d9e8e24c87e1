"""Load test of a peftserve server: a locust workload, a headless runner and its report."""
