"""Hydra launcher plugin: sweeps run as Kubernetes Indexed Jobs (docs/kubernetes-launcher.md)."""
