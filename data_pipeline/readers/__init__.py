"""One module per input format (dicom, nifti, images, medmnist, video); `common` holds
what they share and `registry` picks and configures them for ingestion."""
