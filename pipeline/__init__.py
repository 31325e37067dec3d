"""Rare-lesion segmentation pipeline: I/O, preprocessing, sampling, 3D U-Net, focal + Dice loss,
training, inference in original geometry and lesion-level FROC evaluation."""

__version__ = "0.1.0"
