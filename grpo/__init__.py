"""r1kit's engine: configs, data, models, kernels, rollout workers, GRPO maths and the stage loops."""

__version__ = "0.1.0"
