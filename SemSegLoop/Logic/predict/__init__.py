"""Prediction: sliding-window inference of a trained network over an image, later refinement,
post-processing and suggestions of where to paint next."""
