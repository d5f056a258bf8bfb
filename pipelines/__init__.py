"""The MoE-CL continual-training pipeline: the DAG, its compiler and its launchers."""
from pathlib import Path


def shipped(folder: str) -> Path:
    """A repository folder the pipeline reads (infra/, samples/): beside this package in a source
    checkout, inside it once installed (pyproject.toml maps both into the wheel)."""
    here = Path(__file__).resolve().parent
    return here / folder if (here / folder).is_dir() else here.parent / folder
