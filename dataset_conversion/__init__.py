"""Dataset converters (installed as ``nnunet_ext.dataset_conversion``): one module per dataset,
each runnable as a console command that writes an nnU-Net raw dataset."""
