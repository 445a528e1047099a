"""srtrain: distributed training of image super-resolution U-Nets (see README.md)."""

import os

# Both are read when TensorFlow loads, so they are set here, before any srtrain module imports it;
# a value the user set wins.
# TensorFlow's C++ start-up chatter (CPU instruction sets, ...) stays off every entry point's
# console unless the user asks for it. Not all of it: TensorFlow 2.21 writes a few lines before
# it reads this variable ("oneDNN custom operations are on", "Could not find cuda drivers", each
# under absl's "All log messages before absl::InitializeLog()" warning; tensorflow issue
# #100442), once per process that imports it, so a search prints them for every trial.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's CPU kernels: TensorFlow turns them on by default on Linux only where the CPU has
# AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX, but on AVX2-only CPUs they train the U-Nets faster
# than TensorFlow's own Eigen kernels too (bench/README.md, "CPU kernels").
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
