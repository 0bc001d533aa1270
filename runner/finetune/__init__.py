"""Fine-tuning: train the model on a training split before anything is quantized, once, cached.

- stage.py: the stage of `quantbench run` (the driver): the work item and its cache key, the cached
  model or one training call on a node, what it says;
- train.py: the training itself, on the node (torch, transformers' Trainer).
"""
