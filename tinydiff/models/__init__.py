"""Models: the reference ScoreNet (docs/design.md, the reference model), the scalable score U-Net
(``UNet``, named configurations in ``UNET_CONFIGS``), the autoencoder of latent diffusion
(``Autoencoder``) and the feature classifier."""
from .scorenet import Dense, GaussianFourierProjection, ScoreModel, ScoreNet
from .unet import UNET_CONFIGS, ResBlock, UNet, unet_from_config
from .autoencoder import Autoencoder
from .classifier import Classifier, ClassifierWeightsError, load_classifier
