"""Evaluation of nnU-Net predictions with the papers' metrics, and method comparisons with a report."""
