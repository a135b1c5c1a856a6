"""Planning code that a method needs beyond nnU-Net's own planners (installed as ``nnunet_ext.plans``)."""
