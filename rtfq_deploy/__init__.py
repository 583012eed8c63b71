"""rtfq_deploy: export integer subnets of a retraining-free quantized supernet to edge devices."""

__version__ = "0.1.0"
