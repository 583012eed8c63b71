"""Benchmarks on the device and the choice per budget (``rtfq-bench``).

Everything here runs where only onnxruntime, numpy, click and tabulate are installed:
no module of this package imports torch or onnx (a test asserts it), and matplotlib is
imported only inside the report functions that draw.
"""
