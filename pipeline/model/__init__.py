"""3D U-Net factory and head initialisation."""
