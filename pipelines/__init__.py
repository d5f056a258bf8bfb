"""The MoE-CL continual-training pipeline: the DAG, its compiler and its launchers."""
