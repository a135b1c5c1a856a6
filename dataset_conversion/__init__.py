"""Dataset converters (installed as ``nnunet_ext.dataset_conversion``): one module per dataset,
each runnable as a console command that writes an nnU-Net raw dataset. ``common`` is their shared toolkit.

``CONVERTERS`` maps each converter's name to its module (each has ``main(argv=None)``), so that tests can
sweep every converter; add one line per new converter.
"""

CONVERTERS = {
    "lits": "nnunet_ext.dataset_conversion.lits",
    "busi": "nnunet_ext.dataset_conversion.busi",
    "busis": "nnunet_ext.dataset_conversion.busis",
    "tn3k": "nnunet_ext.dataset_conversion.tn3k",
    "synapse": "nnunet_ext.dataset_conversion.synapse",
    "acdc": "nnunet_ext.dataset_conversion.acdc",
    "kidneyus": "nnunet_ext.dataset_conversion.kidneyus",
    "ussim": "nnunet_ext.dataset_conversion.ussim",
    "liverus": "nnunet_ext.dataset_conversion.liverus",
}
