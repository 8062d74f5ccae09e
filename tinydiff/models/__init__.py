"""Models: the reference ScoreNet (docs/design.md, the reference model) and the feature classifier."""
from .scorenet import Dense, GaussianFourierProjection, ScoreNet
from .classifier import Classifier, ClassifierWeightsError, load_classifier
