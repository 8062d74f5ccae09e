"""Models: the reference ScoreNet (DESIGN.md section 2) and the feature classifier."""
from .scorenet import Dense, GaussianFourierProjection, ScoreNet
