"""DS2D2: Haar decoupling, DISW, the explicit stream and the per-detector implicit streams (see shared/DS2D2.md)."""
from distill.ds2d2.adapter import FeatureAdapter
from distill.ds2d2.disw import disw_weights
from distill.ds2d2.explicit import ExplicitStream
from distill.ds2d2.haar import haar_split, high_frequency

__all__ = ["ExplicitStream", "FeatureAdapter", "disw_weights", "haar_split", "high_frequency"]
