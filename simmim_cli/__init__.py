"""simmim-cli: self-supervised pretraining of vision transformers with SimMIM, from the command line."""

__version__ = "0.1.0"
