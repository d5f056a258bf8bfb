"""moecl: continual instruction tuning of LLMs with MoE-CL, run as an MLOps pipeline."""
__version__ = "0.1.0"
