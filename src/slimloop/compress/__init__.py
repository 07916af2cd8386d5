"""The compression loop, one module per step: sparse, prune, pad, retrain, distill; loop and control."""
