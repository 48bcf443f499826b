"""medpretrain: pretraining 3D medical image segmentation networks when labelled data are scarce."""

__version__ = "0.1.0"
