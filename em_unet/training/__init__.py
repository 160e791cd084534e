"""Training: tf.data pipelines, augmentation, losses, the U-Net, the training assembly that ``train``,
``tune`` and ``study`` share, KerasTuner's distributed mode, and the Keras patches. TensorFlow throughout.
May import every lower layer (io, segmentation, inference, reporting, config).
"""
