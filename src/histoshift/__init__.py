"""histoshift: histopathology patch classification under hospital (center) shift."""
__version__ = "0.1.0"
