"""Models: the reference ScoreNet (DESIGN.md section 2) and the feature classifier."""
from .scorenet import Dense, GaussianFourierProjection, ScoreNet
from .classifier import Classifier, ClassifierWeightsError, load_classifier
