"""srtrain: distributed training of image super-resolution U-Nets (see README.md)."""

import os

# TensorFlow's C++ start-up chatter (CPU instruction sets, ...) stays off every entry point's
# console unless the user asks for it; it is read when TensorFlow loads, so it is set here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
