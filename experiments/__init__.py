"""Experiments that check the paper's claims with onnxaom (see experiments/RESULTS.md).

* :mod:`experiments.fashion_mnist`: Sec. V-A (reduce conv1 then conv2, retrain one epoch with
  the kept kernels frozen), selection quality against L1 magnitude and random selection, and the
  kernel selectivity experiment of Sec. V-C (Fig. 8). The command line; ``--quick`` runs on
  scikit-learn's digits in seconds.
* :mod:`experiments.fig8`: the kernel selectivity experiment (Fig. 8) in the paper's own setting,
  the 6th conv of the paper's CIFAR-10 architecture (trained on Fashion-MNIST).
* :mod:`experiments.torchnet`: the torch side (train, evaluate, remove kernels, freeze, mask).
* :mod:`experiments.selection`: which kernels to keep (proposal strategies, magnitude, random).
* :mod:`experiments.tables`: Markdown tables and Altair charts from the raw numbers.

These modules import torch; the core package ``onnxaom`` never does.
"""
