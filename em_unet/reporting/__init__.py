"""What runs recorded, read back and drawn: history (CSV / TensorBoard) and plots. No TensorFlow except
the lazy reader of TensorBoard event files. Imports :mod:`em_unet.io` and the bottom modules.
"""
