"""Small self-contained studies of the paper (toy problem, Adam's loss-scale invariance), callable
from Python."""
