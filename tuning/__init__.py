"""Search spaces and study definitions that ship with em-unet (installed as ``em_unet.tuning``)."""
